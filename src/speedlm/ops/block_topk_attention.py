"""Block top-k attention (MoBA, Lu et al. 2025, arXiv:2502.13189).

Keys fall into blocks of `block_size` positions (block = position // block_size, counted from
position 0). A causal query attends, in one softmax, to the keys of its own block up to itself
and to every key of the `earlier` earlier blocks whose mean key has the largest dot product with
it (fewer earlier blocks: all of them; equal scores: the later block wins). MoBA's top-k counts
the own block, which it always selects: its top_k is earlier + 1. The gate is a hard
top-k on detached tensors, as in MoBA: gradients reach q, k and v only through attention.

The block summaries are running key sums (`block_key_sums`), so a cache can keep them and a
decode step scores the blocks without re-pooling the keys. The fast form runs each (query,
block) pair, its own block and the selected ones, grouped by block into dense tiles, and merges
a query's pairs by log-sum-exp: O(T * (earlier + 1) * block_size) work, plus the gate's
O(T * blocks) scores (in query chunks), never a T x T matrix. `block_topk_mask` is the rule as a
dense mask, for tests.

Shapes: q (B, H, Tq, Dh); k, v (B, Hkv, Tk, Dh), H % Hkv == 0; q_pos (B|1, Tq) and k_pos
(B|1, Tk) long positions, unique and increasing along each row's keys (a cache keeps its slots
in order); the queries are among the keys (self-attention), so every query sees itself.
"""

from __future__ import annotations

import torch

from speedlm.ops.common import query_scale

_CHUNK_ELEMENTS = 1 << 24  # gate scores (queries x heads x blocks) per query chunk


def summary_dtype(dtype: torch.dtype) -> torch.dtype:
    """Block sums accumulate in float32 (float64 in float64 runs): a bf16 sum of 64 keys would
    round the gate's scores."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def block_key_sums(k: torch.Tensor, k_pos: torch.Tensor, block_size: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of each block's keys, (B, Hkv, n_blocks, Dh), detached (the gate has no gradient);
    added in place into `out` (a cache's running sums, wide enough) when given."""
    b, hkv, tk, dh = k.shape
    ids = (k_pos // block_size).expand(b, tk)
    if out is None:
        out = k.new_zeros(b, hkv, int(ids.max()) + 1, dh, dtype=summary_dtype(k.dtype))
    return out.scatter_add_(2, ids[:, None, :, None].expand(b, hkv, tk, dh), k.detach().to(out.dtype))


def _select(q, means, eligible, earlier):
    """(B, H, Tq, k) indices of each query's `earlier` best eligible blocks and whether each is real
    (eligible); ties go to the later block."""
    b, h, tq, dh = q.shape
    hkv, nb = means.shape[1], means.shape[2]
    qg = q.detach().to(means.dtype).view(b, hkv, h // hkv, tq, dh)
    scores = torch.einsum("bkgtd,bknd->bkgtn", qg, means).reshape(b, h, tq, nb)
    scores = scores.masked_fill(~eligible[:, None], float("-inf"))
    k = min(earlier, nb)
    vals, idx = torch.topk(scores, min(k + 1, nb), dim=-1)
    idx = idx[..., :k]
    if 0 < k < nb:
        # topk leaves the order of equal scores open: where the k-th and the next tie, a stable
        # sort of the reversed blocks decides (the later of two equal blocks first)
        tie = (vals[..., k - 1] == vals[..., k]) & (vals[..., k] > float("-inf"))
        if tie.any():
            rows = scores[tie].flip(-1)
            idx[tie] = nb - 1 - torch.sort(rows, dim=-1, descending=True, stable=True).indices[..., :k]
    return idx, scores.gather(-1, idx) > float("-inf")


def block_topk_attention(q, k, v, q_pos, k_pos, block_sums, block_size: int, earlier: int,
                         scale: float | None = None, chunk: int | None = None) -> torch.Tensor:
    """Block top-k attention of q over k, v given every block's key sums (B, Hkv, NB, Dh) with
    NB = max(k_pos) // block_size + 1; `chunk` queries at a time (default: by a memory budget
    on the gate's scores). Returns (B, H, Tq, Dh) in v's dtype."""
    b, h, tq, dh = q.shape
    nb, bs = block_sums.shape[2], block_size
    kp, qp = k_pos.expand(b, -1).contiguous(), q_pos.expand(b, tq).contiguous()
    # slots of block j: starts[:, j] .. starts[:, j + 1] - 1 (the keys are sorted by position)
    starts = torch.searchsorted(kp, (torch.arange(nb + 1, device=k.device) * bs).expand(b, nb + 1).contiguous())
    counts = starts.diff(dim=-1)  # (B, NB)
    means = block_sums / counts.clamp(min=1)[:, None, :, None].to(block_sums.dtype)
    upto = torch.searchsorted(kp, qp, right=True)  # causal end of each query's keys
    chunk = chunk or max(1, _CHUNK_ELEMENTS // (b * h * max(nb, 1)))
    outs = []
    for c0 in range(0, tq, chunk):
        qc, qpc = q[:, :, c0 : c0 + chunk], qp[:, c0 : c0 + chunk]
        c = qc.shape[2]
        own = qpc // bs  # (B, C)
        eligible = (torch.arange(nb, device=q.device) < own[..., None]) & (counts > 0)[:, None, :]
        idx, real = _select(qc, means, eligible, earlier)
        blocks = torch.cat([own[:, None, :, None].expand(b, h, c, 1), idx], dim=-1)  # (B, H, C, S): own first
        bi = torch.arange(b, device=q.device).view(b, 1, 1, 1)
        first = starts[bi, blocks]
        end = torch.minimum(starts[bi, blocks + 1], upto[:, c0 : c0 + chunk][:, None, :, None])
        lim = (end - first).masked_fill(~torch.cat([real.new_ones(b, h, c, 1), real], -1), 0)
        outs.append(_attend_pairs(qc, k, v, blocks, starts, lim, bs, query_scale(q, scale)))
    return torch.cat(outs, dim=2)


def _attend_pairs(q, k, v, blocks, starts, lim, bs, scale):
    """Each (query, block) pair attends over the first lim keys of its block; the pairs merge
    by log-sum-exp into one softmax per query. Pairs are grouped by (row, head, block) into
    tiles of equal block, so the work is dense matrix products over gathered queries and one
    block of keys per tile (MoBA's varlen plan), O(pairs x block) without per-query key copies."""
    b, h, tq, dh = q.shape
    hkv, tk, s, nb = k.shape[1], k.shape[2], blocks.shape[-1], starts.shape[1] - 1
    acc, dev = summary_dtype(q.dtype), q.device
    tile = min(64, tq)
    lim_flat = lim.reshape(-1)
    pair = lim_flat.nonzero()[:, 0]  # the pairs that read any key, flat over (B, H, Tq, S)
    row_head = pair // (tq * s)  # b * h + head
    group = row_head * nb + blocks.reshape(-1)[pair]
    order = torch.argsort(group, stable=True)
    pair, group = pair[order], group[order]
    count = torch.bincount(group, minlength=b * h * nb)
    padded = (count + tile - 1) // tile * tile
    dest = (padded.cumsum(0) - padded)[group] + torch.arange(len(group), device=dev) - (count.cumsum(0) - count)[group]
    n_slots = int(padded.sum())
    tile_group = torch.repeat_interleave(torch.arange(b * h * nb, device=dev), padded // tile)
    tb, th, tj = tile_group // (h * nb), tile_group // nb % h, tile_group % nb
    kslot = (starts[tb, tj][:, None] + torch.arange(bs, device=dev)).clamp(max=tk - 1)  # each tile's block
    kv_head = (th // (h // hkv))[:, None]
    kt, vt = k[tb[:, None], kv_head, kslot].to(acc), v[tb[:, None], kv_head, kslot].to(acc)  # (tiles, bs, Dh)
    # the queries of each slot (padding slots read a zero row and no key)
    src = torch.full((n_slots,), b * h * tq, device=dev)
    src[dest] = pair // s
    qt = torch.cat([q.reshape(-1, dh), q.new_zeros(1, dh)])[src].to(acc).view(-1, tile, dh)
    keys = torch.zeros(n_slots, dtype=lim.dtype, device=dev)
    keys[dest] = lim_flat[pair]
    logits = torch.bmm(qt, kt.transpose(1, 2)) * scale
    # a finite floor, not -inf: padding rows stay finite, so no NaN reaches the backward pass
    logits = logits.masked_fill(torch.arange(bs, device=dev) >= keys.view(-1, tile, 1), torch.finfo(logits.dtype).min)
    lse = torch.logsumexp(logits, dim=-1).view(-1)
    out = torch.bmm(torch.softmax(logits, dim=-1), vt).view(-1, dh)
    back = torch.full((b * h * tq * s,), n_slots, device=dev)  # pairs that read nothing: a -inf row
    back[pair] = dest
    out = torch.cat([out, out.new_zeros(1, dh)])[back].view(b, h, tq, s, dh)
    lse = torch.cat([lse, lse.new_full((1,), float("-inf"))])[back].view(b, h, tq, s)
    return (torch.softmax(lse, dim=-1)[..., None] * out).sum(-2).to(v.dtype)


def block_topk_mask(q, k, q_pos, k_pos, block_size: int, earlier: int) -> torch.Tensor:
    """(B, H, Tq, Tk) bool: the keys each query attends to, from the rule on dense float64
    scores (a block's rank: the blocks scoring higher plus the later ones scoring the same)."""
    b, h, tq, _ = q.shape
    tk = k.shape[2]
    kr = k.double().repeat_interleave(h // k.shape[1], dim=1)
    qb, kb = (q_pos // block_size).expand(b, tq), (k_pos // block_size).expand(b, tk)
    qp, kp = q_pos.expand(b, tq), k_pos.expand(b, tk)
    nb = int(kb.max()) + 1
    blk = torch.arange(nb, device=k.device)
    member = (kb[:, :, None] == blk).double()  # (B, Tk, NB)
    counts = member.sum(1)
    means = torch.einsum("bhtd,btn->bhnd", kr, member) / counts.clamp(min=1)[:, None, :, None]
    eligible = (blk < qb[..., None]) & (counts > 0)[:, None, :]  # (B, Tq, NB)
    s = (q.double() @ means.transpose(-1, -2)).masked_fill(~eligible[:, None], float("-inf"))
    a, c = s[..., :, None], s[..., None, :]  # block a against block c
    before = (c > a) | ((c == a) & (blk[None, :] > blk[:, None]))
    chosen = eligible[:, None] & (before.sum(-1) < earlier)  # (B, H, Tq, NB)
    past = chosen.gather(-1, kb[:, None, None, :].expand(b, h, tq, tk))
    own = (qb[:, :, None] == kb[:, None, :]) & (kp[:, None, :] <= qp[:, :, None])
    return past | own[:, None]
