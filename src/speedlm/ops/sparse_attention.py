"""Mask-function sparse attention: one pattern, two backends.

A sparse pattern is a callable `mask(q_pos, kv_pos) -> bool tensor` on broadcastable
absolute-position tensors (True = may attend). Later sparse mechanisms (dilated windows,
Longformer, LogSparse, SepLLM, ...) supply only such a function; this module turns it into
attention whose memory follows the pattern, never a dense (T, T) mask:

- `flex` backend: `torch.nn.attention.flex_attention` compiled, with a `BlockMask` built
  from the same function. Used on CUDA (and on CPU for inference if asked): FlexAttention
  has no CPU backward in torch <= 2.13.
- `blocks` backend: pure torch. Queries are cut into blocks; each block gathers only the key
  blocks the pattern touches (like FlexAttention's kv_indices) and runs SDPA on them with a
  small (block x gathered) mask. Memory O(T * keys-per-block), differentiable, any device.

Shapes: q (B, H, Tq, Dh); k, v (B, Hkv, Tk, Dh). Query i is at absolute position
q_start + i, key j at kv_start + j. Rows that may see no key output 0 (flex convention).
Patterns must not depend on batch or head (true of every static pattern here).
"""

from __future__ import annotations

import functools
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from speedlm.ops.attention import attention_reference

MaskFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Evaluating the pattern on a (rows, Tk) slab at a time keeps block discovery O(T) in memory.
_MAX_SLAB_ELEMENTS = 1 << 22


def dense_mask(mask: MaskFn, tq: int, tk: int, q_start: int, kv_start: int, device=None) -> torch.Tensor:
    """(tq, tk) bool mask; for references and tiny decode steps only."""
    q_pos = torch.arange(q_start, q_start + tq, device=device)[:, None]
    k_pos = torch.arange(kv_start, kv_start + tk, device=device)[None, :]
    return torch.broadcast_to(mask(q_pos, k_pos), (tq, tk))


def sparse_attention_reference(q, k, v, mask: MaskFn, q_start: int, kv_start: int, scale=None):
    """Naive form: explicit softmax over the dense mask (run it in float64)."""
    m = dense_mask(mask, q.shape[-2], k.shape[-2], q_start, kv_start, device=q.device)
    return attention_reference(q, k, v, m, scale)


def active_kv_blocks(
    mask: MaskFn, tq: int, tk: int, q_start: int, kv_start: int, block: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block structure of the pattern.

    Returns kv_idx (nQb, K) long: for each query block, the key blocks it touches (padded),
    and valid (nQb, K) bool marking real entries. K is the largest count over query blocks.
    """
    nqb, nkb = -(-tq // block), -(-tk // block)
    k_pos = torch.arange(kv_start, kv_start + nkb * block, device=device)
    k_real = (k_pos - kv_start) < tk
    rows_per_slab = max(block, (_MAX_SLAB_ELEMENTS // max(1, nkb * block)) // block * block)
    active = []
    for r0 in range(0, nqb * block, rows_per_slab):
        rows = torch.arange(r0, min(r0 + rows_per_slab, nqb * block), device=device)
        q_real = rows < tq
        m = mask((q_start + rows)[:, None], k_pos[None, :]) & k_real[None, :] & q_real[:, None]
        active.append(m.view(-1, block, nkb, block).any(dim=3).any(dim=1))
    active = torch.cat(active)  # (nQb, nKb)
    counts = active.sum(dim=1)
    k_max = max(1, int(counts.max()))
    # stable sort puts the active block ids first, in increasing order
    order = torch.argsort((~active).to(torch.int8), dim=1, stable=True)[:, :k_max]
    valid = torch.arange(k_max, device=device)[None, :] < counts[:, None]
    return order, valid


@dataclass(frozen=True)
class BlockPlan:
    """Everything the gathered-block backend derives from the pattern for one shape."""

    block: int
    kv_idx: torch.Tensor  # (nQb, K) key-block ids per query block
    allowed: torch.Tensor  # (nQb, block, K*block) bool; empty rows opened (zeroed after SDPA)
    seen_any: torch.Tensor  # (nQb, block, 1) bool: the query may attend to some key


_PLANS: OrderedDict = OrderedDict()


def block_plan(mask: MaskFn, tq: int, tk: int, q_start: int, kv_start: int, block: int, device) -> BlockPlan:
    """The plan for these shapes and offsets, cached: every layer of a model and every
    training step sees the same shapes, so the pattern is evaluated once, not per call."""
    block = min(block, max(tq, tk))  # short inputs need no padding to a full block
    key = (mask, tq, tk, q_start, kv_start, block, str(device))
    plan = _PLANS.get(key)
    if plan is None:
        kv_idx, valid = active_kv_blocks(mask, tq, tk, q_start, kv_start, block, device)
        nqb, kmax = kv_idx.shape
        q_pos = (q_start + torch.arange(nqb * block, device=device)).view(nqb, block, 1)
        k_local = (kv_idx[:, :, None] * block + torch.arange(block, device=device)).view(nqb, 1, kmax * block)
        allowed = mask(q_pos, kv_start + k_local)
        allowed = allowed & (k_local < tk) & valid.repeat_interleave(block, dim=1)[:, None, :]
        allowed = allowed & (q_pos - q_start < tq)
        seen_any = allowed.any(dim=-1, keepdim=True)
        plan = BlockPlan(block, kv_idx, allowed | ~seen_any, seen_any)
        _PLANS[key] = plan
        while len(_PLANS) > 32:
            _PLANS.popitem(last=False)
    else:
        _PLANS.move_to_end(key)
    return plan


def block_sparse_attention(q, k, v, mask: MaskFn, q_start: int, kv_start: int, scale=None, block: int = 64):
    """Torch backend: gather the touched key blocks per query block, SDPA on (block x K*block)."""
    b, h, tq, dh = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    groups = h // hkv
    plan = block_plan(mask, tq, tk, q_start, kv_start, block, q.device)
    block = plan.block
    nqb, kmax = plan.kv_idx.shape
    nkb = -(-tk // block)

    q_pad = F.pad(q, (0, 0, 0, nqb * block - tq))
    k_pad = F.pad(k, (0, 0, 0, nkb * block - tk))
    v_pad = F.pad(v, (0, 0, 0, nkb * block - tk))
    # (B, Hkv, nKb, block, Dh) -> gathered (B, Hkv, nQb, K*block, Dh)
    k_g = k_pad.view(b, hkv, nkb, block, dh)[:, :, plan.kv_idx].reshape(b, hkv, nqb, kmax * block, dh)
    v_g = v_pad.view(b, hkv, nkb, block, dh)[:, :, plan.kv_idx].reshape(b, hkv, nqb, kmax * block, dh)
    # queries of one KV group share its gathered keys: (B, Hkv, nQb, groups*block, Dh)
    q_g = q_pad.view(b, hkv, groups, nqb, block, dh).permute(0, 1, 3, 2, 4, 5).reshape(b, hkv, nqb, groups * block, dh)
    allowed = plan.allowed.repeat(1, groups, 1) if groups > 1 else plan.allowed  # (nQb, groups*block, K*block)

    out = F.scaled_dot_product_attention(q_g, k_g, v_g, attn_mask=allowed, scale=scale)
    out = out.view(b, hkv, nqb, groups, block, dh) * plan.seen_any.view(1, 1, nqb, 1, block, 1).to(out.dtype)
    out = out.permute(0, 1, 3, 2, 4, 5).reshape(b, h, nqb * block, dh)
    return out[:, :, :tq]


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # shapes change between prefill chunks: let dynamo mark them dynamic instead of
    # recompiling for every length
    return torch.compile(flex_attention, dynamic=None)


_BLOCK_MASKS: OrderedDict = OrderedDict()


def _block_mask(mask: MaskFn, tq: int, tk: int, q_start: int, kv_start: int, device):
    """BlockMask for the pattern at these offsets; cached because training repeats shapes.

    The offsets enter the mask_mod as captured device tensors, not Python ints, so the
    compiled kernel is reused across chunked-prefill offsets rather than recompiled.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    key = (mask, tq, tk, q_start, kv_start, str(device))
    if key not in _BLOCK_MASKS:
        offsets = torch.tensor([q_start, kv_start], device=device)

        def mask_mod(b, h, q_idx, kv_idx):
            return mask(q_idx + offsets[0], kv_idx + offsets[1])

        _BLOCK_MASKS[key] = create_block_mask(mask_mod, None, None, tq, tk, device=device)
        while len(_BLOCK_MASKS) > 16:
            _BLOCK_MASKS.popitem(last=False)
    return _BLOCK_MASKS[key]


def flex_sparse_attention(q, k, v, mask: MaskFn, q_start: int, kv_start: int, scale=None):
    """FlexAttention backend (compiled). No CPU backward in torch <= 2.13."""
    bm = _block_mask(mask, q.shape[-2], k.shape[-2], q_start, kv_start, q.device)
    return _compiled_flex()(q, k, v, block_mask=bm, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


_flex_failed: str | None = None  # set once if FlexAttention cannot compile on this machine


def _prefers_flex(q: torch.Tensor) -> bool:
    # FlexAttention has no CPU backward (torch <= 2.13); on CUDA it is the fused kernel
    return q.is_cuda


def sparse_attention(q, k, v, mask: MaskFn, q_start: int, kv_start: int, scale=None, backend: str = "auto"):
    """Dispatch: `flex` on CUDA, `blocks` elsewhere; decode steps (Tq == 1) use a (1, Tk) mask.

    One fallback: if FlexAttention fails to compile (e.g. CUDA without a working Triton), `auto`
    warns once and uses `blocks` from then on; an explicit `flex` still raises.
    """
    global _flex_failed
    if backend == "auto":
        backend = "flex" if _prefers_flex(q) and _flex_failed is None else "blocks"
        if backend == "flex":
            try:
                return sparse_attention(q, k, v, mask, q_start, kv_start, scale, "flex")
            except Exception as e:  # noqa: BLE001 - compile failures come in many types
                _flex_failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                warnings.warn(f"FlexAttention unavailable ({_flex_failed}); using the gathered-block backend")
                backend = "blocks"
    if q.shape[-2] == 1:
        m = dense_mask(mask, 1, k.shape[-2], q_start, kv_start, device=q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    if backend == "flex":
        return flex_sparse_attention(q, k, v, mask, q_start, kv_start, scale)
    if backend == "blocks":
        return block_sparse_attention(q, k, v, mask, q_start, kv_start, scale)
    raise ValueError(f"unknown sparse attention backend {backend!r}; use 'auto', 'flex' or 'blocks'")
