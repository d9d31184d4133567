"""Softmax attention: the explicit dense reference, and the one entry point every attention
mixer calls (`attention`), which picks SDPA's fused kernels for plain causal or unmasked
attention and the mask-function sparse path (ops/sparse_attention.py) for everything else.

Shapes: q (B, H, Tq, Dh); k, v (B, Hkv, Tk, Dh) with H % Hkv == 0 (MHA: Hkv == H,
GQA: 1 < Hkv < H, MQA: Hkv == 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from speedlm.ops.common import query_scale
from speedlm.ops.marked_attention import marked_window_attention
from speedlm.ops.masks import AttentionMask, Full
from speedlm.ops.sparse_attention import sparse_attention


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, Hkv, T, Dh) -> (B, Hkv * groups, T, Dh): each KV head serves `groups` query heads."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None = None,
) -> torch.Tensor:
    """Explicit softmax(q k^T * scale + mask) v, in the inputs' dtype (use float64 for reference).

    mask: (Tq, Tk), (B, Tq, Tk) or per head (B, H, Tq, Tk) bool, True where a query may attend; rows with no allowed
    key give 0 (the FlexAttention convention).
    """
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    scale = query_scale(q, scale)
    scores = (q @ k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~(mask if mask.dim() in (2, 4) else mask[:, None]), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # fully masked rows -> 0
    return probs @ v


def causal_mask(tq: int, tk: int, device=None) -> torch.Tensor:
    """(tq, tk) bool mask for queries that are the last tq of tk positions (lower-right aligned)."""
    q_pos = torch.arange(tk - tq, tk, device=device)[:, None]
    k_pos = torch.arange(tk, device=device)[None, :]
    return k_pos <= q_pos


def causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Causal attention where the queries are the last Tq of the Tk keys (training, prefill,
    chunked prefill and decoding alike), on torch's fused SDPA kernels.

    GQA/MQA use SDPA's native `enable_gqa` so K/V are never materialised per query head.
    """
    tq, tk = q.shape[-2], k.shape[-2]
    gqa = q.shape[1] != k.shape[1]
    if tq == 1:  # decoding: the single query sees every cached key
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    if tq == tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    # chunked prefill: the new block attends to the whole cache plus its own causal triangle
    mask = causal_mask(tq, tk, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def _window_is_redundant(mask: AttentionMask) -> bool:
    """No KV-policy window, or one wider than anything the pattern reaches (a mixer's own
    window policy, which only trims its cache): the pattern alone decides."""
    if mask.window is None:
        return True
    reach = getattr(mask.pattern, "max_distance", None)
    return mask.k_mark is None and reach is not None and reach() < mask.window


def attention(q, k, v, mask: AttentionMask, scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """Attention under `mask`, on the cheapest exact path: SDPA's causal kernels for plain causal
    attention, SDPA without a mask for unmasked (bidirectional) attention, the window + marked
    keys form for a KV policy's window (SepLLM, sinks), a pattern's own `plan` where it has one
    (the dilated window's residue classes), else the sparse dispatch (compiled FlexAttention on
    CUDA, gathered key blocks elsewhere)."""
    if isinstance(mask.pattern, Full) and mask.window is not None and mask.causal:
        if q.shape[-2] == 1:  # one decoding query: its (1, Tk) mask row is as cheap as it gets
            row = mask.dense(q.device)[:, None]
            return F.scaled_dot_product_attention(q, k, v, attn_mask=row, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
        return marked_window_attention(q, k, v, mask, scale)
    plan = getattr(mask.pattern, "plan", None)
    if plan is not None and mask.contiguous and q.shape[-2] > 1 and _window_is_redundant(mask):
        return plan(q, k, v, mask, scale, backend)  # a pattern with an exact plan of its own (dilation)
    if isinstance(mask.pattern, Full) and mask.window is None and mask.contiguous:
        if mask.causal and mask.k_pos + mask.tk == mask.q_pos + mask.tq:
            return causal_sdpa(q, k, v, scale)
        if not mask.causal:
            return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    if isinstance(mask.pattern, Full) and mask.window is None and mask.q_doc is None and mask.k_mark is None and mask.causal:
        # explicit positions (a Mixture-of-Depths block's routed tokens, per-row positions): a
        # full pattern ignores them (RoPE has used them), causality is by index, the queries
        # are the last keys: plain causal attention
        return causal_sdpa(q, k, v, scale)
    return sparse_attention(q, k, v, mask, scale, backend=backend)
