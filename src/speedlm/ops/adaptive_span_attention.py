"""Adaptive-span attention (Sukhbaatar et al. 2019, arXiv:1905.07799): causal softmax attention
whose weights are multiplied by a soft mask of the distance, one per head, and renormalised:

    a_ij = m_h(i - j) exp(s_ij) / sum_k m_h(i - k) exp(s_ik),   m_h(x) = clamp((R + z_h - x) / R, 0, 1)

with z_h head h's span in tokens and R the ramp: m is 1 up to distance z_h, falls linearly to 0
over the next R tokens and is 0 beyond. So a query reads only the keys at distances below
`reach` = ceil(max_h z_h) + R, and the fast form scores, per block of queries, only the keys from
reach - 1 indices before the block's first query to its causal end: O(T * (reach + block)) time
and memory, never a T x T mask. The dense reference is the paper's own order (softmax, times the
mask, renormalised), for tests in float64.

The hard restrictions (causality, documents, a KV policy's window and marks) come from the same
`AttentionMask` (ops/masks.py) as every other attention op; this op adds the soft weights, from
the same positions.

Shapes: q (B, H, Tq, Dh); k, v (B, Hkv, Tk, Dh), H % Hkv == 0, queries the last Tq keys;
spans (H,) in tokens (differentiable). Rows that may see no key output 0.
"""

from __future__ import annotations

import torch

from speedlm.ops.attention import repeat_kv
from speedlm.ops.common import query_scale
from speedlm.ops.masks import AttentionMask

QUERY_BLOCK = 128


def span_mask(distance: torch.Tensor, spans: torch.Tensor, ramp: int) -> torch.Tensor:
    """m_h(x) = clamp((R + z_h - x) / R, 0, 1): distance (Bm, Tq, Tk), spans (H,) -> (Bm, H, Tq, Tk).

    The span's gradient flows only through keys on the open ramp, 0 < m < 1 (`clamp` would pass
    it at m = 0 too, i.e. through a key the trimmed attention and cache no longer hold)."""
    raw = (ramp + spans[:, None, None] - distance[:, None].to(spans.dtype)) / ramp
    return torch.where(raw <= 0, 0.0, torch.where(raw >= 1, 1.0, raw))


def adaptive_span_attention_reference(q, k, v, allowed, distance, spans, ramp: int, scale=None):
    """Dense form. allowed (Bm, Tq, Tk) bool (causality, documents, a policy's mask), distance
    (Bm, Tq, Tk) q_pos - k_pos."""
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    scale = query_scale(q, scale)
    scores = ((q @ k.transpose(-1, -2)) * scale).masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)
    probs = probs * span_mask(distance, spans, ramp)
    return probs / probs.sum(-1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny) @ v


def _positions(pos: int | torch.Tensor, lo: int, hi: int, device) -> torch.Tensor:
    """(Bm, hi - lo) positions of indices lo..hi-1."""
    if isinstance(pos, int):
        return torch.arange(pos + lo, pos + hi, device=device)[None]
    return pos[:, lo:hi]


def _index_bound_holds(mask: AttentionMask) -> bool:
    """Keys within `reach` positions of a query lie within `reach` indices of it when positions
    grow by at least one per key index (contiguous positions, a cache that dropped slots, packed
    documents whose positions restart: other documents are masked anyway). Positions that repeat
    (e.g. left padding at one position) break it; then every causal key is scored."""
    if isinstance(mask.k_pos, int):
        return True
    step_ok = mask.k_pos.diff(dim=-1) >= 1
    if mask.k_doc is not None:
        step_ok = step_ok | (mask.k_doc.diff(dim=-1) != 0)
    return bool(step_ok.all())


def adaptive_span_attention(q, k, v, mask: AttentionMask, spans, ramp: int, reach: int, scale=None,
                            block: int = QUERY_BLOCK):
    """Blocked form. `reach`: no key at distance >= reach is read (it covers every key with m > 0;
    a smaller one is a hard cap, the paper's max_span)."""
    assert mask.causal, "adaptive-span attention is causal"
    b, h, tq, dh = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    g = h // hkv
    shift = tk - tq
    scale = query_scale(q, scale)
    banded = _index_bound_holds(mask)
    outs = []
    for s in range(0, tq, block):
        e = min(tq, s + block)
        lo, hi = (max(0, s + shift - reach + 1) if banded else 0), e + shift  # causal end: query i sees index i + shift
        qi = torch.arange(s, e, device=q.device).view(1, -1, 1)
        kj = torch.arange(lo, hi, device=q.device).view(1, 1, -1)
        dist = _positions(mask.q_pos, s, e, q.device)[:, :, None] - _positions(mask.k_pos, lo, hi, q.device)[:, None, :]
        m = span_mask(dist, spans, ramp) * (mask(qi, kj) & (dist < reach))[:, None]  # (Bm, H, bq, nk)
        m = m.view(m.shape[0], hkv, g, e - s, hi - lo)
        # queries of one KV group share its keys: scores (B, Hkv, g, bq, nk), never repeated K/V
        scores = torch.einsum("bkgqd,bknd->bkgqn", q[..., s:e, :].view(b, hkv, g, e - s, dh), k[..., lo:hi, :]) * scale
        seen = m > 0
        # weights where m = 0 are 0 anyway; masking them first keeps the max over real keys, and
        # rows that see nothing get finite scores (then m zeroes them)
        scores = scores.masked_fill(~seen, float("-inf")).masked_fill(~seen.any(-1, keepdim=True), 0.0)
        probs = torch.softmax(scores, dim=-1) * m
        probs = probs / probs.sum(-1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)
        outs.append(torch.einsum("bkgqn,bknd->bkgqd", probs, v[..., lo:hi, :]).reshape(b, h, e - s, -1))
    return torch.cat(outs, dim=-2)
