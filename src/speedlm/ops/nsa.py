"""Native sparse attention (NSA, Yuan et al. 2025, arXiv:2502.11089): three attention branches per
query, mixed by learned gates,

- compressed: every complete block of `block_size` keys (and values) pooled to its mean; a query
  attends to the pooled blocks that lie wholly before or at it ((c + 1) * bs - 1 <= t);
- selected: the blocks with the largest compressed-attention probability (averaged over the
  query heads of a KV group, so a group reads the same blocks), `top_n` of them, the first block,
  the query's own and the previous one always among them; the query attends to those blocks'
  keys up to itself, in one softmax;
- sliding window: the last `window` keys.

Cost per query: T / bs pooled keys, top_n * bs selected keys, `window` keys; nothing T x T is
built. The compressed scores are computed per query chunk, the selected pairs through block
top-k attention's gathered tiles (ops/block_topk_attention.py: pairs grouped by block into dense
tiles, merged by log-sum-exp), the window through the band plan of sliding-window attention.
The selection is a hard top-k on detached scores (gradients reach q, k, v through the attention
of the selected blocks and the compressed branch, as in the paper).

Shapes: q (B, H, Tq, D); k, v (B, Hkv, Tk, D), the queries the last Tq of the Tk keys, keys at
positions 0 .. Tk - 1 (a full cache). `nsa_masks` builds the selected and window branches'
rules as dense masks, for tests and the reference.
"""

from __future__ import annotations

import torch

from speedlm.ops.attention import attention, repeat_kv
from speedlm.ops.block_topk_attention import _attend_pairs
from speedlm.ops.masks import AttentionMask, SlidingWindow

_CHUNK_ELEMENTS = 1 << 24  # compressed scores (queries x heads x blocks) per query chunk


def pooled_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """(B, Hkv, T, D) -> (B, Hkv, T // bs, D): the mean of every complete block."""
    n = x.shape[2] // block_size
    return x[:, :, : n * block_size].unflatten(2, (n, block_size)).mean(3)


def compressed_attention(q, k_cmp, v_cmp, q_pos: torch.Tensor, block_size: int, scale: float):
    """(output (B, H, Tq, D), probabilities (B, H, Tq, NB)) of the queries over the pooled blocks
    they may see; a query that sees none gets zeros."""
    groups = q.shape[1] // k_cmp.shape[1]
    kc, vc = repeat_kv(k_cmp, groups), repeat_kv(v_cmp, groups)
    nb = kc.shape[2]
    visible = (torch.arange(nb, device=q.device) + 1) * block_size - 1 <= q_pos[:, None]  # (Tq, NB)
    scores = (q @ kc.transpose(-1, -2)) * scale
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # rows with no visible block
    return probs @ vc, probs


def block_scores(probs, q_pos: torch.Tensor, kv_heads: int, n_blocks: int, block_size: int) -> torch.Tensor:
    """(B, Hkv, Tq, n_blocks) what the selection ranks: the KV group's mean compressed probability
    of each block (detached), 1 for the forced blocks (the first, the own and the previous one),
    -inf for blocks a query may not select (not yet complete and not forced)."""
    b, h, tq, nb = probs.shape
    score = probs.detach().view(b, kv_heads, h // kv_heads, tq, nb).mean(2)
    score = torch.cat([score, score.new_zeros(b, kv_heads, tq, n_blocks - nb)], dim=-1)  # blocks not yet pooled
    blk = torch.arange(n_blocks, device=probs.device)
    own = (q_pos // block_size)[:, None]
    forced = (blk == 0) | (blk == own) | (blk == own - 1)
    allowed = forced | ((blk + 1) * block_size - 1 <= q_pos[:, None])
    return torch.where(forced, torch.ones_like(score), score).masked_fill(~allowed, float("-inf"))


def select_blocks(probs, q_pos: torch.Tensor, kv_heads: int, n_blocks: int, block_size: int, top_n: int):
    """(blocks (B, Hkv, Tq, S), real (B, Hkv, Tq, S)): each query's top_n blocks by `block_scores`."""
    vals, idx = block_scores(probs, q_pos, kv_heads, n_blocks, block_size).topk(min(top_n, n_blocks), dim=-1)
    return idx, vals > float("-inf")


def selected_attention(q, k, v, blocks, real, q_pos: torch.Tensor, block_size: int, scale: float):
    """Each query over its selected blocks' keys up to itself (one softmax)."""
    b, h, tq, _ = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    nb = -(-tk // block_size)
    starts = (torch.arange(nb + 1, device=q.device) * block_size).clamp(max=tk).expand(b, nb + 1)
    blocks = blocks.repeat_interleave(h // hkv, dim=1)
    real = real.repeat_interleave(h // hkv, dim=1)
    first = blocks * block_size
    end = torch.minimum((blocks + 1) * block_size, (q_pos + 1)[:, None].expand_as(blocks)).clamp(max=tk)
    lim = (end - first).clamp(min=0).masked_fill(~real, 0)
    return _attend_pairs(q, k, v, blocks, starts.contiguous(), lim, block_size, scale)


def nsa_branches(q, k, v, block_size: int, top_n: int, window: int, scale: float | None = None):
    """(compressed, selected, window) outputs, each (B, H, Tq, D)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    b, h, tq, _ = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    q_pos = torch.arange(tk - tq, tk, device=q.device)
    k_cmp, v_cmp = pooled_blocks(k, block_size), pooled_blocks(v, block_size)
    n_blocks = -(-tk // block_size)
    chunk = max(1, _CHUNK_ELEMENTS // (b * h * max(1, k_cmp.shape[2])))
    cmp_out, sel_out = [], []
    for c0 in range(0, tq, chunk):
        qc, pc = q[:, :, c0 : c0 + chunk], q_pos[c0 : c0 + chunk]
        out, probs = compressed_attention(qc, k_cmp, v_cmp, pc, block_size, scale)
        blocks, real = select_blocks(probs, pc, hkv, n_blocks, block_size, top_n)
        cmp_out.append(out)
        sel_out.append(selected_attention(qc, k, v, blocks, real, pc, block_size, scale))
    swa = attention(q, k, v, AttentionMask(SlidingWindow(window), tq, tk, tk - tq, 0, True), scale)
    return torch.cat(cmp_out, 2), torch.cat(sel_out, 2), swa


def nsa_masks(probs, tk: int, kv_heads: int, block_size: int, top_n: int, window: int):
    """Dense (B, H, Tq, Tk) masks of the selected and window branches, from the compressed
    probabilities (queries the last Tq of the Tk keys): a block is selected when fewer than top_n
    allowed blocks score higher (for the float64 reference; the fast path takes `topk`)."""
    b, h, tq, _ = probs.shape
    q_pos = torch.arange(tk - tq, tk, device=probs.device)
    score = block_scores(probs, q_pos, kv_heads, -(-tk // block_size), block_size)
    higher = (score[..., None, :] > score[..., :, None]).sum(-1)  # (B, Hkv, Tq, NB)
    chosen = (score > float("-inf")) & (higher < top_n)
    key_blk = torch.arange(tk, device=probs.device) // block_size
    causal = torch.arange(tk, device=probs.device) <= q_pos[:, None]
    selected = chosen.gather(-1, key_blk.expand(b, kv_heads, tq, tk)) & causal
    swa = causal & (q_pos[:, None] - torch.arange(tk, device=probs.device) < window)
    return selected.repeat_interleave(h // kv_heads, dim=1), swa
