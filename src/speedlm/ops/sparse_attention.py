"""Mask-function sparse attention: one `AttentionMask` (ops/masks.py), two backends, never a
dense (T, T) mask.

- `flex`: `torch.nn.attention.flex_attention` compiled, with a `BlockMask` built from the
  mask's `mask_mod`. Preferred on CUDA; on CPU usable for inference only (FlexAttention has no
  CPU backward in torch <= 2.13).
- `blocks`: pure torch. Queries are cut into blocks; each block gathers only the key blocks the
  mask touches (like FlexAttention's kv_indices) and runs SDPA on them with a small
  (block x gathered) mask. Memory O(T * keys-per-block), differentiable, any device. A mask
  that differs between rows (per-row positions, packed documents, non-contiguous cached keys)
  gets a per-row plan.

Shapes: q (B, H, Tq, Dh); k, v (B, Hkv, Tk, Dh). Rows that may see no key output 0 (flex
convention).
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from speedlm.ops.dispatch import Dispatch
from speedlm.ops.masks import AttentionMask

# Evaluating the mask on a (rows, Tk) slab at a time keeps block discovery O(T) in memory.
_MAX_SLAB_ELEMENTS = 1 << 22


def sparse_attention_reference(q, k, v, mask: AttentionMask, scale=None):
    """Naive form: explicit softmax over the dense mask (run it in float64)."""
    from speedlm.ops.attention import attention_reference  # the dense softmax, shared with full attention

    return attention_reference(q, k, v, mask.dense(q.device), scale)


def active_kv_blocks(mask: AttentionMask, block: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Block structure of the mask.

    Returns kv_idx (Bm, nQb, K) long: for each query block, the key blocks it touches (padded),
    and valid (Bm, nQb, K) bool marking real entries. K is the largest count over query blocks;
    Bm is the mask's batch (1 when every row shares it).
    """
    tq, tk = mask.tq, mask.tk
    nqb, nkb = -(-tq // block), -(-tk // block)
    kj = torch.arange(nkb * block, device=device)
    k_real = kj < tk
    kj = kj.clamp(max=tk - 1).view(1, 1, -1)  # padding columns: evaluated at a real key, then masked
    rows_per_slab = max(block, (_MAX_SLAB_ELEMENTS // max(1, mask.batch * nkb * block)) // block * block)
    active = []
    for r0 in range(0, nqb * block, rows_per_slab):
        rows = torch.arange(r0, min(r0 + rows_per_slab, nqb * block), device=device)
        m = mask(rows.clamp(max=tq - 1).view(1, -1, 1), kj) & k_real & (rows < tq)[:, None]
        active.append(m.view(m.shape[0], -1, block, nkb, block).any(dim=4).any(dim=2))
    active = torch.cat(active, dim=1)  # (Bm, nQb, nKb)
    counts = active.sum(dim=-1)
    k_max = max(1, int(counts.max()))
    # stable sort puts the active block ids first, in increasing order
    order = torch.argsort((~active).to(torch.int8), dim=-1, stable=True)[..., :k_max]
    valid = torch.arange(k_max, device=device) < counts[..., None]
    return order, valid


@dataclass(frozen=True)
class BlockPlan:
    """Everything the gathered-block backend derives from the mask for one shape."""

    block: int
    kv_idx: torch.Tensor  # (Bm, nQb, K) key-block ids per query block
    allowed: torch.Tensor  # (Bm, nQb, block, K*block) bool; empty rows opened (zeroed after SDPA)
    seen_any: torch.Tensor  # (Bm, nQb, block, 1) bool: the query may attend to some key


_PLANS: OrderedDict = OrderedDict()


def _make_plan(mask: AttentionMask, block: int, device) -> BlockPlan:
    kv_idx, valid = active_kv_blocks(mask, block, device)
    bm, nqb, kmax = kv_idx.shape
    qi = torch.arange(nqb * block, device=device).view(1, nqb, block, 1)
    kj = (kv_idx[..., None] * block + torch.arange(block, device=device)).view(bm, nqb, 1, kmax * block)
    allowed = mask(qi.clamp(max=mask.tq - 1), kj.clamp(max=mask.tk - 1))
    allowed = allowed & (kj < mask.tk) & valid.repeat_interleave(block, dim=-1)[:, :, None, :] & (qi < mask.tq)
    seen_any = allowed.any(dim=-1, keepdim=True)
    return BlockPlan(block, kv_idx, allowed | ~seen_any, seen_any)


def block_plan(mask: AttentionMask, block: int, device) -> BlockPlan:
    """The plan for this mask. Contiguous masks are cached: every layer of a model and every
    training step sees the same shapes, so the pattern is evaluated once, not per call."""
    block = min(block, max(mask.tq, mask.tk))  # short inputs need no padding to a full block
    if mask.plan_key is None:
        return _make_plan(mask, block, device)
    key = (mask.plan_key, block, str(device))
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _make_plan(mask, block, device)
        while len(_PLANS) > 32:
            _PLANS.popitem(last=False)
    else:
        _PLANS.move_to_end(key)
    return plan


def block_sparse_attention(q, k, v, mask: AttentionMask, scale=None, block: int = 64):
    """Torch backend: gather the touched key blocks per query block, SDPA on (block x K*block)."""
    b, h, tq, dh = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    groups = h // hkv
    plan = block_plan(mask, block, q.device)
    block = plan.block
    bm, nqb, kmax = plan.kv_idx.shape
    nkb = -(-tk // block)

    q_pad = F.pad(q, (0, 0, 0, nqb * block - tq))
    k_blocks = F.pad(k, (0, 0, 0, nkb * block - tk)).view(b, hkv, nkb, block, dh)
    v_blocks = F.pad(v, (0, 0, 0, nkb * block - tk)).view(b, hkv, nkb, block, dh)
    if bm == 1:  # (B, Hkv, nKb, block, Dh) -> gathered (B, Hkv, nQb, K*block, Dh)
        k_g = k_blocks[:, :, plan.kv_idx[0]].reshape(b, hkv, nqb, kmax * block, dh)
        v_g = v_blocks[:, :, plan.kv_idx[0]].reshape(b, hkv, nqb, kmax * block, dh)
    else:  # a different selection per row
        rows = torch.arange(b, device=q.device)[:, None, None]
        k_g = k_blocks[rows, :, plan.kv_idx].permute(0, 3, 1, 2, 4, 5).reshape(b, hkv, nqb, kmax * block, dh)
        v_g = v_blocks[rows, :, plan.kv_idx].permute(0, 3, 1, 2, 4, 5).reshape(b, hkv, nqb, kmax * block, dh)
    # queries of one KV group share its gathered keys: (B, Hkv, nQb, groups*block, Dh)
    q_g = q_pad.view(b, hkv, groups, nqb, block, dh).permute(0, 1, 3, 2, 4, 5).reshape(b, hkv, nqb, groups * block, dh)
    allowed = plan.allowed.repeat(1, 1, groups, 1) if groups > 1 else plan.allowed  # (Bm, nQb, groups*block, K*block)

    out = F.scaled_dot_product_attention(q_g, k_g, v_g, attn_mask=allowed[:, None], scale=scale)
    out = out.view(b, hkv, nqb, groups, block, dh) * plan.seen_any.view(bm, 1, nqb, 1, block, 1).to(out.dtype)
    out = out.permute(0, 1, 3, 2, 4, 5).reshape(b, h, nqb * block, dh)
    return out[:, :, :tq]


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # shapes change between prefill chunks: let dynamo mark them dynamic instead of
    # recompiling for every length
    return torch.compile(flex_attention, dynamic=None)


_BLOCK_MASKS: OrderedDict = OrderedDict()


def _block_mask(mask: AttentionMask, device):
    """BlockMask for the mask; cached for contiguous masks because training repeats shapes."""
    from torch.nn.attention.flex_attention import create_block_mask

    key = None if mask.plan_key is None else (mask.plan_key, str(device))
    if key is not None and key in _BLOCK_MASKS:
        _BLOCK_MASKS.move_to_end(key)
        return _BLOCK_MASKS[key]
    batch = mask.batch if mask.batch > 1 else None
    bm = create_block_mask(mask.mask_mod(device), batch, None, mask.tq, mask.tk, device=device)
    if key is not None:
        _BLOCK_MASKS[key] = bm
        while len(_BLOCK_MASKS) > 16:
            _BLOCK_MASKS.popitem(last=False)
    return bm


def flex_sparse_attention(q, k, v, mask: AttentionMask, scale=None):
    """FlexAttention backend (compiled). No CPU backward in torch <= 2.13."""
    bm = _block_mask(mask, q.device)
    return _compiled_flex()(q, k, v, block_mask=bm, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def _decode_or(fn):
    """Single-token steps skip plans: a (1, Tk) mask row is as cheap as it gets."""

    def run(q, k, v, mask: AttentionMask, scale=None):
        if q.shape[-2] == 1:
            m = mask.dense(q.device)[:, None]  # (Bm, 1, 1, Tk)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
        return fn(q, k, v, mask, scale)

    return run


SPARSE_ATTENTION = Dispatch("sparse attention", "blocks", _decode_or(block_sparse_attention))
# FlexAttention has no CPU backward (torch <= 2.13); on CUDA it is the fused kernel
SPARSE_ATTENTION.register("flex", _decode_or(lambda *a: flex_sparse_attention(*a)), usable=lambda q, *a, **k: q.is_cuda)


def sparse_attention(q, k, v, mask: AttentionMask, scale=None, backend: str = "auto"):
    """Dispatch: `flex` on CUDA, `blocks` elsewhere (see ops/dispatch.py for the fallback rule)."""
    return SPARSE_ATTENTION(q, k, v, mask, scale, backend=backend)
