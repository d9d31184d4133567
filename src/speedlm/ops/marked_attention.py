"""Causal attention over a local window plus marked keys (SepLLM's initial tokens and
separators, attention sinks), at a cost that follows the keys each query actually sees.

A gathered-block plan degenerates to dense here: separators occur in every key block, so every
block would be touched. Instead each block of queries attends to two sets of keys in one
softmax:

- the window span: the contiguous key indices from the first one inside the window of the
  block's first query to the block's causal end (about window + block keys), masked exactly;
- the marked keys before that span, compacted (gathered in index order), which every query of
  the block sees; only their prefix before the span is used, so the total cost is
  O(T * (window + block + marked keys before each block)).

With contiguous positions and no documents (training, prefill from an empty cache) the CPU path
is ops/marked_window_flash.py instead: the window as one band over all queries and the marked
keys in large unmasked blocks, a few fused calls per layer. This form serves the rest.

Both parts go through the one mask function (ops/masks.py), so the result is the dense
reference's by construction, also with per-row positions (non-contiguous cached keys),
documents and per-row marks. Positions must be non-decreasing along the keys (a cache keeps
its slots in order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from speedlm.ops.masks import AttentionMask, Full
from speedlm.ops.marked_window_flash import applies as window_flash_applies
from speedlm.ops.marked_window_flash import gather_keys, marked_window_flash
from speedlm.ops.merged_attention import can_merge, merged_attention

QUERY_BLOCK = 128


def _window_start(mask: AttentionMask, first_query: int) -> int:
    """The first key index that the window of query `first_query` reaches in any row."""
    w = mask.window
    if isinstance(mask.q_pos, int) and isinstance(mask.k_pos, int):
        return max(0, mask.q_pos + first_query - w + 1 - mask.k_pos)
    qp = mask.q_pos + first_query if isinstance(mask.q_pos, int) else mask.q_pos[:, first_query]
    kp = mask.k_pos if isinstance(mask.k_pos, torch.Tensor) else None
    if kp is None:
        return max(0, int(torch.as_tensor(qp).min()) - w + 1 - mask.k_pos)
    qp = torch.as_tensor(qp, device=kp.device).reshape(-1, 1)
    b = max(qp.shape[0], kp.shape[0])
    starts = torch.searchsorted(kp.expand(b, -1).contiguous(), (qp - w + 1).expand(b, 1).contiguous())
    return int(starts.min())


def _marked_prefix(marked, lo: int, mask: AttentionMask, qi: torch.Tensor, query_free: bool):
    """The marked keys left of key index `lo` as (keys, values, allowed (Bm, 1, queries or 1, p)),
    or None when there are none; `query_free`: every query sees all of them (one mask row)."""
    if marked is None or lo == 0:
        return None
    before, order, k_m, v_m = marked
    count = before[:, lo]  # (Bm,) marked keys left of the span
    p = int(count.max())
    if not p:
        return None
    seen = (torch.arange(p, device=count.device) < count[:, None])[:, None, :]  # (Bm, 1, p)
    if not query_free:
        seen = mask(qi, order[:, :p][:, None, :]) & seen
    return k_m[..., :p, :], v_m[..., :p, :], seen[:, None]


def marked_window_attention(q, k, v, mask: AttentionMask, scale=None, block: int = QUERY_BLOCK):
    """q (B, H, Tq, Dh), k/v (B, Hkv, Tk, Dh) under a causal mask with a `window` (and
    optional `k_mark`); queries are the last Tq keys. Rows that see no key output 0."""
    assert mask.causal and mask.window is not None, "marked-window attention is causal with a window"
    fused = can_merge(q)
    if fused and window_flash_applies(q, mask):  # contiguous positions, no documents: a few fused calls per layer
        return marked_window_flash(q, k, v, mask, scale)
    tq, tk = q.shape[-2], k.shape[-2]
    shift = tk - tq
    gqa = q.shape[1] != k.shape[1]
    dev = q.device
    marked = None
    if mask.k_mark is not None:
        marks = mask.k_mark
        before = F.pad(marks.long().cumsum(-1), (1, 0))  # (Bm, Tk + 1): marked keys with index < j
        m_max = int(before[:, -1].max())
        if m_max:
            order = torch.argsort((~marks).to(torch.int8), dim=-1, stable=True)[:, :m_max]  # marked first, in order
            marked = (before, order, gather_keys(k, order), gather_keys(v, order))
    # Marked keys left of a block's window span are before all its queries: with no documents,
    # positions that are index offsets and no other pattern, every query of the block sees every
    # one of them, so that part's mask is one row (the kernel broadcasts it), not block x keys
    query_free = isinstance(mask.pattern, Full) and mask.q_doc is None and isinstance(mask.q_pos, int) \
        and isinstance(mask.k_pos, int)
    outs = []
    for s in range(0, tq, block):
        e = min(tq, s + block)
        lo = min(_window_start(mask, s), s + shift)
        hi = e + shift  # causal: query i sees keys up to index i + shift
        qi = torch.arange(s, e, device=dev).view(1, -1, 1)
        allowed = mask(qi, torch.arange(lo, hi, device=dev).view(1, 1, -1))
        keys, values = k[..., lo:hi, :], v[..., lo:hi, :]
        prefix = _marked_prefix(marked, lo, mask, qi, fused and query_free)
        if fused:  # the window span and the marked prefix as two fused parts: no per-block copy of keys
            parts = [(keys, values, allowed[:, None])] if prefix is None else [prefix, (keys, values, allowed[:, None])]
            outs.append(merged_attention(q[..., s:e, :], parts, scale))
            continue
        if prefix is not None:
            k_p, v_p, seen_p = prefix
            b = max(seen_p.shape[0], allowed.shape[0])
            allowed = torch.cat([seen_p[:, 0].expand(b, -1, -1), allowed.expand(b, -1, -1)], dim=-1)
            keys, values = torch.cat([k_p, keys], dim=-2), torch.cat([v_p, values], dim=-2)
        seen = allowed.any(-1, keepdim=True)
        out = F.scaled_dot_product_attention(
            q[..., s:e, :], keys, values, attn_mask=(allowed | ~seen)[:, None], scale=scale, enable_gqa=gqa
        )
        outs.append(out * seen[:, None].to(out.dtype))
    return torch.cat(outs, dim=-2)
