"""Every registered mixer, FFN and block kind: its analytic FLOP count (layers/flops.py, README
"How FLOPs are counted") against what `FlopCounterMode` measures on its forward.

One table, one row per registered part (a registered part without a row fails the test): the
options that build it at preset-like sizes, and the expected executed / counted ratio of its
matrix products beside its Linear layers (`Flops.matmul`), with the tolerance and, where the
ratio is not 1, the reason: the implementation computes more than the visible pairs the
convention charges (whole key blocks gathered for a window, dense C x C chunks under a causal
mask, ...). Where the ratio is a function of T it is written as the implementation's work over
the count. The parts' Linear layers are checked apart (executed within 1 %), through the
counter's per-module attribution, so nothing the counter can attribute is subtracted by hand.
Work the counter cannot see (elementwise scans, FFTs, vecdot walks) is `Flops.other`, unchecked.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import pytest
import torch

from speedlm.bench.common import text_token_ids
from speedlm.bench.flops import counted_by_module, linear_flops_of
from speedlm.layers.context import AuxLosses
from speedlm.layers.dims import ModelDims
from speedlm.layers.flops import attention_flops
from speedlm.layers.mixer import SeqMeta, linear_flops
from speedlm.layers.rope import apply_rope
from speedlm.models.registry import BLOCKS, FFNS, MIXERS
from speedlm.ops.band_attention import MAX_EXCESS, band_block
from speedlm.ops.block_topk_attention import block_topk_mask
from speedlm.ops.marked_window_flash import STAIR_BLOCK, prefix_block

DIMS = ModelDims(d_model=64, n_heads=4, max_seq_len=1024, ffn_hidden=192)
LENGTHS = (256, 1024)


# ----- what the implementations compute (matrix products per token, beside Linear layers) -----
def _blocks(n: int, size: int) -> int:
    return -(-n // size)


def gathered_keys(t: int, window: int, causal: bool = True, global_keys=(), block: int = 64) -> float:
    """Keys per query of the gathered-block plan for a window (ops/sparse_attention.py): each
    block of `block` queries reads K whole key blocks, K the most any query block needs (its band
    on one side or both, and the blocks holding global keys)."""
    block = min(block, t)
    k = 0
    for a in range(0, t, block):
        e = min(t, a + block) - 1
        lo, hi = max(0, a - window + 1), e if causal else min(t - 1, e + window - 1)
        k = max(k, len(set(range(lo // block, hi // block + 1)) | {g // block for g in global_keys}))
    return k * block * _blocks(t, block) * block / t


def window_keys(t: int, window: int, causal: bool = True) -> float:
    """Keys per query of a sliding window (ops/sparse_attention.py): a band narrower than the
    keys runs as overlapping key windows (ops/band_attention.py), each block of queries reading
    block + width - 1 keys; a wider one takes the gathered-block plan."""
    width = window if causal else 2 * window - 1
    if width >= t:
        return gathered_keys(t, window, causal)
    block = band_block(width)
    block = -(-t // _blocks(t, block))  # as few padded queries as that many blocks allow
    return _blocks(t, block) * block * (block + width - 1) / t


def dilated_keys(t: int, window: int, dilations: list[int], causal: bool = True) -> float:
    """Per head, a sliding window on each residue class of its dilation (ops/dilated_attention.py)."""
    per_head = []
    for d in dilations:
        sizes = [len(range(r, t, d)) for r in range(d)]
        per_head.append(sum(n * window_keys(n, window, causal) for n in sizes if n) / t)
    return sum(per_head) / len(per_head)


def banded_keys(t: int, span_before: int, block: int) -> float:
    """Query blocks of `block` reading from `span_before` keys before their first query to their
    causal end (ops/adaptive_span_attention.py, ops/marked_attention.py without marks)."""
    total = 0
    for s in range(0, t, block):
        e = min(t, s + block)
        total += (e - s) * (e - max(0, s - span_before))
    return total / t


def marked_keys(t: int, window: int, marks: torch.Tensor) -> float:
    """ops/marked_window_flash.py: the band plan's blocks read block + window - 1 keys each (padded
    rows too); each prefix block of queries reads the marked keys left of its first query's window
    (unmasked), and each staircase sub-block the rest up to its last query's (masked)."""
    block = band_block(window)
    nb = _blocks(t, block)
    block = _blocks(t, nb)
    band = nb * block * (block + window - 1)
    before = torch.nn.functional.pad(marks.long().cumsum(0), (1, 0))
    seen = lambda i: int(before[max(0, i - window + 1)])  # noqa: E731  marked keys left of query i's window
    prefix, step = 0, prefix_block(t)
    for s in range(0, t, step):  # every query of the block sees seen(s) unmasked, each sub-block up to its last query's
        e = min(t, s + step)
        prefix += (e - s) * seen(s)
        prefix += sum((min(e, a + STAIR_BLOCK) - a) * (seen(min(e, a + STAIR_BLOCK) - 1) - seen(s))
                      for a in range(s, e, STAIR_BLOCK))
    return (band + prefix) / t


def chunks(m, t: int, chunk: int | None = None) -> tuple[int, float]:
    """(C, padding factor): chunked forms run on the length padded to whole chunks."""
    c = max(1, min(chunk or m.chunk_size, t))
    return c, _blocks(t, c) * c / t


def attn(m, keys: float) -> float:
    return attention_flops(m.n_heads, keys, m.head_dim, m.head_dim)


def sliding_window(m, t, **_):
    return attn(m, window_keys(t, m.window))


def longformer(m, t, **_):
    # 128-query blocks read the globals and a band of 128 + window - 1 keys; the g global rows a dense g x g call
    g = len(m.globals)
    return attn(m, (g + 128 + m.window - 1) * _blocks(t, 128) * 128 / t + g * g / t)


def longformer_linear(m, t, causal=True, **_):
    """The global projections on the prefix (causal), on every token (bidirectional: the global
    queries too, where only the global rows need them); the output projection again on the g rows."""
    g = len(m.globals)
    glob = linear_flops(m.q_global, m.k_global, m.v_global) * (g / t if causal else 1)
    return m.projection_flops() + glob + linear_flops(m.o_proj) * g / t


def longformer_bidirectional(m, t, **_):
    # the generic gathered-block plan (band on both sides, the globals' block); the g global rows
    # padded to one 64-query block against every key
    g = len(m.globals)
    return attn(m, gathered_keys(t, m.window, False, m.globals) + _blocks(g, 64) * 64)


def sepllm(m, t, ids, **_):
    marks = m.policy.mark(ids, 0, t, "cpu")[0]
    return attn(m, marked_keys(t, m.window, marks))


def block_topk(m, t, x, **_):
    """Each (query, block) pair reads the whole block, in tiles of 64 pairs per (head, block),
    the last one padded: how many queries pick each block is data, read here from the rule's
    mask on this input. The gate scores every block."""
    bs, nb = m.block_size, _blocks(t, m.block_size)
    q, k, _ = m.project(x)
    cos, sin = m._rope_table(0, t, q)
    pos = torch.arange(t)[None]
    mask = block_topk_mask(apply_rope(q, cos, sin), apply_rope(k, cos, sin), pos, pos, bs, m.earlier)[0]  # (H, T, T)
    reads = torch.nn.functional.pad(mask, (0, nb * bs - t)).view(m.n_heads, t, nb, bs).any(-1)  # (H, T, blocks)
    slots = (torch.div(reads.sum(1) + 63, 64, rounding_mode="floor") * 64).sum().item()  # per (head, block), whole tiles
    return 2.0 * m.n_heads * m.head_dim * nb + 4.0 * m.head_dim * bs * slots / t


def nsa(m, t, x, **_):
    """The compressed branch scores every complete block (both products); the selected pairs as
    block top-k's tiles of 64 per (head, block), the last one padded, read from this input's
    selection; the window on the band plan."""
    from speedlm.ops.nsa import compressed_attention, pooled_blocks, select_blocks

    bs, d, h = m.block_size, m.head_dim, m.n_heads
    q, k, v = m.project(x)
    cos, sin = m._rope_table(0, t, q)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    pos = torch.arange(t)
    _, probs = compressed_attention(q, pooled_blocks(k, bs), pooled_blocks(v, bs), pos, bs, d**-0.5)
    blocks, real = select_blocks(probs, pos, m.kv_heads, _blocks(t, bs), bs, m.top_n)
    blocks = blocks.repeat_interleave(h // m.kv_heads, dim=1)[0]  # (H, T, S)
    reads = (blocks * bs <= pos[:, None]) & real.repeat_interleave(h // m.kv_heads, dim=1)[0]
    per = torch.zeros(h, _blocks(t, bs), dtype=torch.long).scatter_add_(1, (blocks * reads).flatten(1),
                                                                     reads.flatten(1).long())
    slots = (torch.div(per + 63, 64, rounding_mode="floor") * 64).sum().item()
    return 4.0 * h * d * (t // bs) + 4.0 * d * bs * slots / t + attn(m, window_keys(t, m.window))


def reformer(m, t, causal=True, **_):
    # per hash round, blocks of C sorted queries against a band of 3C - 1 (bidirectional 4C - 2) sorted keys
    c, pad = chunks(m, t, m.chunk)
    band = 3 * c - 1 if causal else 4 * c - 2
    hashing = 2.0 * m.n_heads * m.head_dim * (m.n_buckets // 2) * m.n_hashes
    return hashing + m.n_hashes * attention_flops(m.n_heads, band * pad, m.head_dim, m.head_dim)


def adaptive_span(m, t, **_):
    return attn(m, banded_keys(t, m.span_window() - 1, 128))


def transformer_xl(m, t, **_):
    # 64-query blocks: content and values over a band of 64 + mem + segment - 1 keys, the
    # position term over every one of the mem + segment distances
    reach, block = m.mem_len + m.segment, min(64, t)
    pad = _blocks(t, block) * block / t
    return 2.0 * m.n_heads * m.head_dim * (2 * (block + reach - 1) + reach) * pad


def linear_attention(m, t, **_):
    c, pad = chunks(m, t)
    dk, dv = m.head_dim, m.head_dim + 1  # the normaliser channel
    return m.n_heads * (attention_flops(1, c, dk, dv) + 4 * dk * dv) * pad


def performer(m, t, **_):
    c, pad = chunks(m, t)
    f, dv = m.features, m.head_dim + 1
    return m.n_heads * (4 * f * m.head_dim + (attention_flops(1, c, f, dv) + 4 * f * dv) * pad)


def based(m, t, **_):
    c, pad = chunks(m, t)
    f, dv = m.n_features, m.value_dim + 1
    return m.n_heads * (attention_flops(1, c, f, dv) + 4 * f * dv) * pad


def retnet(m, t, **_):
    c, pad = chunks(m, t)
    return m.n_heads * (attention_flops(1, c, m.key_dim, m.value_dim) + 4 * m.key_dim * m.value_dim) * pad


def mlstm(m, t, **_):
    # retention's dense chunks and state products, plus the normaliser's read q . n per token
    return retnet(m, t) + m.n_heads * 2 * m.key_dim * chunks(m, t)[1]


def rwkv7(m, t, **_):
    # every C x C product dense (its causal mask applied after), on the padded length
    c, pad = chunks(m, t)
    dk = dv = m.head_dim
    return m.n_heads * (2 * c * (5 * dk + 3 * dv) + 2 * dk * dk + 6 * dk * dv + 2 * dk * dk * dv / c) * pad


def ttt_linear(m, t, **_):
    # the (L x L) mini-batch products dense under their causal mask (T here is whole mini-batches)
    c, pad = chunks(m, t, m.mini_batch)
    return m.n_heads * (8 * m.head_dim**2 + 4 * c * m.head_dim * pad)


def gla(m, t, **_):
    # per-channel decays: the scores' lower triangle at 16-token sub-block granularity, (C + 16) / 2
    # keys per query; the mix over the whole chunk
    c, pad = chunks(m, t)
    dk, dv = m.key_dim, m.value_dim
    return m.n_heads * (2 * (c + 16) / 2 * dk + 2 * c * dv + 4 * dk * dv) * pad


def forgetting_blocks(m, t, **_):
    # per block of queries, SDPA over every key up to its last query (the block's diagonal
    # dense under a bool mask), q, k and v one channel wider for the forget bias
    n, w = m.block_size, m.head_dim + 1
    return m.n_heads * sum(4 * min(n, t - a) * min(a + n, t) * w for a in range(0, t, n)) / t


def mla_padded(m, t, **_):
    # causal SDPA over the expanded heads, values zero-padded to the query/key width
    return attention_flops(m.n_heads, (t + 1) / 2, m.qk_dim, m.qk_dim)


def moh_routed(m, t, x=None, **_):
    # shared heads: causal SDPA; routed heads: blocks of selected queries, each reading the keys up
    # to its last query's position (ops/routed_heads.py), on the routing this input gets
    from speedlm.ops.routed_heads import block_key_ends, gather_order

    _, probs, chosen = m._route(x)
    sel = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, chosen, True).transpose(1, 2)
    idx, valid = gather_order(sel)
    rows_heads = idx.shape[0] * idx.shape[1]
    routed = sum(rows_heads * (e - a) * keys for a, e, keys in block_key_ends(idx, valid, m.block_size))
    return attention_flops(m.shared, (t + 1) / 2, m.head_dim, m.head_dim) + attention_flops(1, routed / t, m.head_dim, m.head_dim)


def deltanet(m, t, **_):
    # K K^T, Q K^T, A W and A U dense per chunk; the solve is not a product the counter sees
    c, pad = chunks(m, t)
    dk, dv = m.key_dim, m.value_dim
    return m.n_heads * (2 * c * dk * 3 + 2 * c * dv + 2 * dk * dk + 4 * dk * dv + 2 * dk * dk * dv / c) * pad


def mamba2(m, t, **_):
    c, pad = chunks(m, t)
    n, p = m.d_state, m.head_dim
    return (m.n_groups * 2 * c * n + m.n_heads * (2 * c * p + 4 * p * n)) * pad


def hymba_window(m, t, **_):
    return sliding_window(m.attn, t) + m.ssm.flops_breakdown(t).matmul


def parallel_hybrid(m, t, **_):
    return m.attn.flops_breakdown(t).matmul + mamba2(m.ssm, t)


# ----- the table -----
COUNTED = None  # the expected ratio is 1: executed == counted
CHUNKS = "the chunked form computes each C x C chunk product dense; the causal mask leaves (C + 1) / 2 keys per query visible"


@dataclass
class Row:
    options: dict
    executed: Callable | None = COUNTED  # (part, T, ids=, x=, causal=) -> matmul FLOPs per token the implementation computes
    linear: Callable | None = COUNTED  # (part, T, causal=) -> what its Linear layers compute, where not the count
    tol: float = 0.01
    why: str = "-"
    causal: bool = True
    training: bool = False  # MoD routes by top-k at its capacity in training
    prepare: Callable | None = None  # set data-dependent values as training would leave them
    fixed: dict = field(default_factory=dict)  # the block kinds' mixer and FFN specs


def _learned_spans(m):
    with torch.no_grad():  # spans as training leaves them, not the init: the count must follow
        m.span.copy_(torch.tensor([0.06, 0.025, 0.0, 0.012]))


MIXER_ROWS = {
    "attention": Row({"kv_heads": 2}, why="causal SDPA counted at the pairs a causal kernel computes (bench/flops.py)"),
    "sliding_window": Row({"window": 32, "kv_heads": 2}, sliding_window,
                          why="band plan: blocks of 10 queries read their 41 keys (10 + window - 1) for a 32-key window"),
    "dilated_window": Row({"window": 32, "dilation": [1, 2, 4, 8]},
                          lambda m, t, **_: attn(m, dilated_keys(t, m.window, m.dilations)),
                          why="a sliding window on each residue class, as sliding_window (band plan; classes shorter than the window: gathered blocks)"),
    "logsparse": Row({"local": 4, "conv_kernel": 3, "kv_heads": 2},
                     why="attention is a vecdot/addcmul walk over the distances: invisible, only projections checked"),
    "longformer": Row({"window": 32, "global_tokens": 4, "kv_heads": 2}, longformer, linear=longformer_linear,
                      why="128-query blocks read the globals and a band of 128 + window - 1 keys; o_proj runs "
                          "again on the global rows"),
    "sepllm": Row({"window": 32, "kv_heads": 2}, sepllm,
                  why="the band plan's blocks read block + window - 1 keys; blocks of T / 8 queries read the marks left "
                      "of their first query's window, sub-blocks of 128 the rest up to their last query's; counted at the typical separator rate (35 %), executed on this "
                      "text's own separators"),
    "block_topk": Row({"block_size": 16, "top_k": 3, "kv_heads": 2}, block_topk,
                      why="each (query, block) pair reads the whole block (own block too), in tiles of 64 pairs "
                          "per (head, block), the last one padded; the gate scores every block, not only earlier ones"),
    "nsa": Row({"block_size": 32, "top_n": 4, "window": 64, "kv_heads": 2}, nsa,
               why="pooled scores against every complete block; selected pairs in padded tiles of 64 per (head, "
                   "block) as block_topk; the window's band plan"),
    "reformer": Row({"n_hashes": 2, "chunk": 32, "n_buckets": 16}, reformer,
                    why="per round a band of 3C - 1 sorted keys per query; the visible pairs are the bucket's keys "
                        "in the own and previous chunk (T / n_buckets per bucket)"),
    "adaptive_span": Row({"max_span": 1024, "ramp": 32, "kv_heads": 2}, adaptive_span, prepare=_learned_spans,
                         why="128-query blocks read reach - 1 keys before their first query, every head at the "
                             "largest head's reach; counted: each head's own span"),
    "transformer_xl": Row({"mem_len": 128, "segment": 128, "kv_heads": 2}, transformer_xl,
                          why="64-query blocks score a band of 64 + mem + segment - 1 keys, and every distance"),
    "linformer": Row({"k": 64, "kv_heads": 2}, causal=False, why="bidirectional only"),
    "mla": Row({}, mla_padded, why="the expanded form's values are zero-padded to nope + rope (one head width for "
                                    "the fused kernels): (2 qk) / (qk + v)"),
    "moh": Row({}, moh_routed, why="routed heads: 64-query blocks of each head's tokens read the keys up to the "
                                     "block's last position, padded to the busiest head"),
    "forgetting_attention": Row({"kv_heads": 2}, forgetting_blocks,
                                why="256-query blocks read every key up to their last query, one channel wider (the "
                                    "forget bias): (T + 256) / 2 keys per query at D + 1"),
    "lite_transformer": Row({"kernel": 7, "conv_heads": 4}),
    "linear_attention": Row({"chunk_size": 64}, linear_attention, why=CHUNKS),
    "performer": Row({"chunk_size": 64}, performer, why=CHUNKS),
    "based": Row({"chunk_size": 64, "feature_dim": 16}, based, why=CHUNKS + " (Taylor features: elementwise)"),
    "base_conv": Row({"kernel": 3}, why="the short conv is shifted multiply-adds: invisible, only projections checked"),
    "retnet": Row({"chunk_size": 64}, retnet, why=CHUNKS),
    "gla": Row({"chunk_size": 64}, gla, why=CHUNKS + " (scores in 16-token sub-blocks: (C + 16) / 2)"),
    "deltanet": Row({"chunk_size": 32}, deltanet, why=CHUNKS + " (K K^T: C - 1 of them for the solve)"),
    "gated_deltanet": Row({"chunk_size": 32}, deltanet, why=CHUNKS + " (K K^T: C - 1 of them for the solve)"),
    "hgrn": Row({"chunk_size": 64}, why="elementwise recurrence: invisible, only projections checked"),
    "hgrn2": Row({"chunk_size": 64}, gla, why=CHUNKS + " (GLA's per-channel form: scores in 16-token sub-blocks)"),
    "mlstm": Row({"chunk_size": 64}, mlstm, why=CHUNKS + " (the normaliser's q . n beside them)"),
    "rwkv7": Row({"chunk_size": 32}, rwkv7, why=CHUNKS + " (eight C x C products; the solve is invisible)"),
    "ttt_linear": Row({"mini_batch": 16}, ttt_linear, why="each mini-batch's Q K^T and its product with the "
                                                        "gradients are dense 16 x 16 under a causal mask"),
    "hyena": Row({"filter_order": 64, "emb_dim": 33}, why="the filter MLP is counted; the FFT convolutions are invisible"),
    "mamba": Row({"chunk_size": 32}, why="the scan's read-out is a bmm, counted; its recurrence is invisible"),
    "mamba2": Row({"head_dim": 32, "chunk_size": 64}, mamba2, why=CHUNKS + " (C B^T per group)"),
    "hymba": Row({"window": 32, "kv_heads": 2, "full_attention": False}, hymba_window,
                 why="its sliding-window branch as sliding_window (band plan); the Mamba branch as mamba"),
    "parallel_hybrid": Row({"kv_heads": 2, "d_inner": 96, "ssm_head_dim": 32, "chunk_size": 64}, parallel_hybrid,
                           why="its attention branch as attention (counted); the Mamba-2 branch as mamba2 (" + CHUNKS + ")"),
}
FFN_ROWS = {
    "swiglu": Row({}),
    "moe": Row({"experts": 8, "top_k": 2, "shared": 1}, why="dropless: every token through k experts"),
    "none": Row({}),
}
_INNER = {"mixer": {"name": "attention", "kv_heads": 2}, "ffn": {"name": "swiglu"}}
BLOCK_ROWS = {
    "prenorm": Row({}, fixed=_INNER),
    "conformer": Row({"kernel": 15}, fixed=_INNER, why="a 15-tap depthwise conv is one F.conv1d, counted"),
    "mod": Row({"capacity": 0.125}, fixed=_INNER, training=True,
               why="training: top-k routes exactly ceil(capacity T) tokens through the block"),
}
# mixers that also run bidirectionally (encoders, diffusion LMs), there
_SW, _LA = MIXER_ROWS["sliding_window"].options, MIXER_ROWS["linear_attention"].options
BIDIRECTIONAL_ROWS = {
    "attention": Row({"kv_heads": 2}, why="SDPA without a mask: every pair"),
    "sliding_window": Row(_SW, lambda m, t, **_: attn(m, window_keys(t, m.window, False)),
                          why="band plan: blocks of 19 queries read their 81 keys for a +-31 band (63 keys)"),
    "dilated_window": Row(MIXER_ROWS["dilated_window"].options,
                          lambda m, t, **_: attn(m, dilated_keys(t, m.window, m.dilations, False)),
                          why="the band plan on each residue class, both sides (short classes: gathered blocks)"),
    "logsparse": Row(MIXER_ROWS["logsparse"].options, why="vecdot walk: invisible, only projections checked"),
    "longformer": Row(MIXER_ROWS["longformer"].options, longformer_bidirectional, linear=longformer_linear,
                      why="gathered blocks for the band and the globals' block; the 4 global rows padded to a "
                          "64-query block; global queries projected for every token"),
    "reformer": Row(MIXER_ROWS["reformer"].options, reformer, why="per round a band of 4C - 2 sorted keys per query"),
    "linear_attention": Row(_LA, why="the state k^T v once, read by every query"),
    "performer": Row(_LA, why="as linear_attention, over the random features"),
    "based": Row(MIXER_ROWS["based"].options, why="as linear_attention, over the Taylor features"),
    "linformer": MIXER_ROWS["linformer"],
    "lite_transformer": Row(MIXER_ROWS["lite_transformer"].options, why="dense SDPA, centred convolution"),
    "moh": Row({}, lambda m, t, **_: attention_flops(m.n_heads, t, m.head_dim, m.head_dim),
               why="bidirectional calls compute every head and gate it"),
    "mla": Row({}, lambda m, t, **_: attention_flops(m.n_heads, t, m.qk_dim, m.qk_dim),
               why="SDPA without a mask, values zero-padded to nope + rope"),
}
for _row in BIDIRECTIONAL_ROWS.values():
    _row.causal = False
TABLE = {("mixer", n): r for n, r in MIXER_ROWS.items()} | {("ffn", n): r for n, r in FFN_ROWS.items()} \
    | {("block", n): r for n, r in BLOCK_ROWS.items()} | {("bidirectional", n): r for n, r in BIDIRECTIONAL_ROWS.items()}
REGISTRIES = {"mixer": MIXERS, "ffn": FFNS, "block": BLOCKS, "bidirectional": MIXERS}


def test_every_registered_part_has_a_row():
    missing = [f"{kind} {name}" for kind, reg in REGISTRIES.items() for name in reg
               if (kind, name) not in TABLE and (kind != "bidirectional" or reg[name].cls.supports_bidirectional)]
    assert not missing, f"add a row to tests/layers/test_flop_convention.py for: {missing}"


def build(kind: str, name: str, row: Row):
    torch.manual_seed(0)
    part = REGISTRIES[kind].build({"name": name, **row.options}, DIMS, **row.fixed)
    if row.prepare is not None:
        row.prepare(part)
    return part.train(row.training)


def inputs(t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A part's input (1, T, D) and the text ids beside it (SepLLM's separators)."""
    return torch.randn(1, t, DIMS.d_model, generator=torch.Generator().manual_seed(t)), text_token_ids((1, t), seed=t)


def counted(part, kind: str, t: int, causal: bool):
    if kind == "ffn":
        return part.flops_breakdown()
    return part.flops_breakdown(t, causal)


@pytest.mark.parametrize("kind,name", list(TABLE), ids=[f"{k}-{n}" for k, n in TABLE])
def test_counted_flops_match_the_counter(kind, name):
    check_row(kind, name, TABLE[(kind, name)])


# softmax attention's projection and position options (Qwen2 / Qwen3 / Qwen3-Next, hf/qwen.py):
# biases and norms are uncounted, a wider head and the gate's projection are
ATTENTION_OPTIONS = {"qkv_bias": True, "qk_norm": True, "head_dim": 24, "rope_dim": 8, "output_gate": True}


@pytest.mark.parametrize("kind,name", [("mixer", "attention"), ("mixer", "sliding_window"), ("bidirectional", "attention")])
def test_attention_options_are_counted_as_the_counter_sees(kind, name):
    row = TABLE[(kind, name)]
    check_row(kind, name, replace(row, options={**row.options, **ATTENTION_OPTIONS}))


def check_row(kind: str, name: str, row: Row) -> None:
    part = build(kind, name, row)
    for t in LENGTHS:
        x, ids = inputs(t)
        meta = SeqMeta(token_ids=ids, causal=row.causal, aux=AuxLosses())
        with torch.no_grad():
            total, per = counted_by_module(lambda: part(x, meta), part)
        linear = linear_flops_of(per, part) / t
        matmul = total / t - linear
        c = counted(part, kind, t, row.causal)
        if kind != "ffn":  # the parts are consistent: flops_per_token is the breakdown's sum
            total_count = part.flops_per_token(t) if row.causal else part.bidirectional_flops_per_token(t)
            assert c.total == pytest.approx(total_count, rel=1e-12)
        expected_linear = c.linear if row.linear is COUNTED else row.linear(part, t, causal=row.causal)
        assert linear == pytest.approx(expected_linear, rel=1e-3, abs=1e-9), f"{name} T={t}: Linear layers"
        if row.executed is COUNTED:
            assert matmul == pytest.approx(c.matmul, rel=row.tol, abs=1e-9), f"{name} T={t}: {row.why}"
            continue
        with torch.no_grad():
            expected = row.executed(part, t, ids=ids, x=x, causal=row.causal)
        assert matmul == pytest.approx(expected, rel=row.tol), f"{name} T={t}: ratio {matmul / c.matmul:.3f} " \
                f"vs expected {expected / c.matmul:.3f} ({row.why})"


@pytest.mark.parametrize("kind", ["mixer", "bidirectional"])
def test_the_sliding_window_executes_at_most_one_and_a_half_times_its_counted_pairs(kind):
    """Issue 26: the counter sees at most 1.5x the attention products the window counts (the band
    plan sizes its query blocks for MAX_EXCESS; the first queries' ramp adds the rest)."""
    row = TABLE[(kind, "sliding_window")]
    for t in LENGTHS:
        _, matmul = measured(kind, "sliding_window", row, t)
        ratio = matmul / counted(build(kind, "sliding_window", row), kind, t, row.causal).matmul
        assert MAX_EXCESS * 0.9 < ratio <= 1.5, f"T={t}: executed / counted = {ratio:.3f}"


def test_models_sum_their_blocks_breakdowns():
    """A model's analytic count is its blocks' breakdowns plus its head, for every preset kind of
    model (the bench compares the visible part of exactly this)."""
    from speedlm.bench.flops import counted_breakdown
    from speedlm.models import build_model

    for preset in ("transformer", "mod", "conformer", "jamba", "mdlm", "linformer"):
        model = build_model(preset)
        blocks, own = counted_breakdown(model, 256)
        assert sum(b.total for b in blocks) + own.total == pytest.approx(model.flops_per_token(256, training=False))


def test_adaptive_span_is_counted_at_its_current_spans_and_on_meta_at_the_initial_ones():
    from speedlm.ops.masks import window_mean_keys

    spec = {"name": "adaptive_span", "max_span": 1024, "ramp": 32, "init_span": [0.05, 0.0, 0.0, 0.0]}
    m = MIXERS.build(spec, DIMS)
    with torch.device("meta"):
        planned = MIXERS.build(spec, DIMS)
    assert planned.flops_per_token(256) == m.flops_per_token(256)  # no values on meta: the initial spans
    keys = (window_mean_keys(256, 52 + 32) + 3 * window_mean_keys(256, 32)) / 4  # each head its own reach
    assert m.flops_breakdown(256).matmul == pytest.approx(attention_flops(4, keys, 16, 16))
    with torch.no_grad():
        m.span.copy_(torch.tensor([0.1, 0.1, 0.0, 0.0]))  # as training moved them
    keys = (2 * window_mean_keys(256, 103 + 32) + 2 * window_mean_keys(256, 32)) / 4
    assert m.flops_breakdown(256).matmul == pytest.approx(attention_flops(4, keys, 16, 16))


def measured(kind: str, name: str, row: Row, t: int) -> tuple[float, float]:
    """(executed Linear FLOPs, executed other matrix products) per token of one forward."""
    part = build(kind, name, row)
    x, ids = inputs(t)
    meta = SeqMeta(token_ids=ids, causal=row.causal, aux=AuxLosses())
    with torch.no_grad():
        total, per = counted_by_module(lambda: part(x, meta), part)
    linear = linear_flops_of(per, part) / t
    return linear, total / t - linear


def ratio_table() -> list[str]:
    """The measured executed / counted ratios of every row, of the matrix products beside the
    Linear layers (and of the Linear layers where not 1), for BENCHMARKS.md."""
    lines = []
    for (kind, name), row in TABLE.items():
        part = build(kind, name, row)
        cells = []
        for t in LENGTHS:
            c = counted(part, kind, t, row.causal)
            linear, matmul = measured(kind, name, row, t)
            cell = f"{matmul / c.matmul:.2f}" if c.matmul else "not seen" if row.why.endswith("checked") else "-"
            if c.linear and abs(linear / c.linear - 1) > 1e-6:
                cell += f" (Linear {linear / c.linear:.3f})"
            cells.append(cell)
        lines.append(f"| {kind} {name} | {' | '.join(cells)} | {row.tol:.0%} | {row.why} |")
    return lines


if __name__ == "__main__":
    print("| part | T=256 | T=1024 | tolerance | why the ratio is not 1 |\n|---|---|---|---|---|")  # cd tests first
    print("\n".join(ratio_table()))
