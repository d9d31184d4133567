"""Mask-function sparse attention: one `AttentionMask` (ops/masks.py), two backends, never a
dense (T, T) mask.

- `flex`: `torch.nn.attention.flex_attention` compiled, with a `BlockMask` built from the
  mask's `mask_mod`. Preferred on CUDA; on CPU usable for inference only (FlexAttention has no
  CPU backward in torch <= 2.13).
- `blocks`: pure torch. Queries are cut into blocks; each block gathers only the key blocks the
  mask touches (like FlexAttention's kv_indices) and runs SDPA on them with a small
  (block x gathered) mask. A band on contiguous positions (the sliding window) skips the plan:
  overlapping key windows, one shared mask (ops/band_attention.py). Memory O(T * keys-per-block), differentiable, any device. A mask
  that differs between rows (per-row positions, packed documents, non-contiguous cached keys)
  gets a per-row plan.

Shapes: q (B, H, Tq, Dh); k, v (B, Hkv, Tk, Dh). Rows that may see no key output 0 (flex
convention).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections import OrderedDict
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from speedlm.ops.band_attention import band_attention
from speedlm.ops.caches import register
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

    Found without the mask's T x T pairs where the pattern allows (ops/masks.py): a band on
    contiguous positions in O(T / block), exactly; any other mask with a `may_attend` pattern
    from each block's position, document and index ranges in O(Bm * nQb * nKb), a superset whose
    extra blocks the plan masks out; a pattern with neither by evaluating every pair.
    """
    bounds = _band_bounds(mask)
    if bounds is not None:
        return _band_blocks(mask, block, device, *bounds)
    if hasattr(mask.pattern, "may_attend"):
        return _compact(_blockwise_active(mask, block, device), device)
    return _compact(evaluated_active_blocks(mask, block, device), device)


def _band_bounds(mask: AttentionMask) -> tuple[int, int] | None:
    """(c1, c2) such that query i may see exactly the key indices i + c1 .. i + c2 (within
    0 .. Tk - 1), for a band pattern on contiguous positions; None for any other mask."""
    band = getattr(mask.pattern, "distance_range", None)
    if band is None or not mask.contiguous:
        return None
    lo, hi = band()
    off = mask.q_pos - mask.k_pos  # q_pos - k_pos of query i and key j is i - j + off
    unbounded = mask.tq + mask.tk  # beyond any index difference
    c1 = max(-unbounded if hi is None else off - hi, -unbounded if mask.window is None else off - mask.window + 1)
    c2 = min(unbounded if lo is None else off - lo, mask.tk - mask.tq if mask.causal else unbounded)
    return c1, c2


def _band_blocks(mask: AttentionMask, block: int, device, c1: int, c2: int):
    """Each query block's keys are the union of its queries' ranges [i + c1, i + c2], whose ends
    both grow with i: one range, from its first query's start to its last query's end."""
    nqb, nkb = -(-mask.tq // block), -(-mask.tk // block)
    q_lo = torch.arange(nqb, device=device) * block
    q_hi = (q_lo + block).clamp(max=mask.tq) - 1
    lo, hi = (q_lo + c1).clamp(min=0), (q_hi + c2).clamp(max=mask.tk - 1)
    first, last = lo // block, hi // block
    counts = torch.where((lo <= hi) & (c1 <= c2), last - first + 1, 0)
    k_max = max(1, int(counts.max()))
    slot = torch.arange(k_max, device=device)
    kv_idx = (first.clamp(max=nkb - 1)[:, None] + slot).clamp(max=nkb - 1)  # padding: any real block
    return kv_idx[None], (slot < counts[:, None])[None]


def _block_ranges(values: int | torch.Tensor, t: int, block: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block of `block` indices, the smallest and largest value: (B|1, nb) each. `values` is
    a (B|1, T) tensor, or an int start s for the values s + index."""
    nb = -(-t // block)
    if isinstance(values, int):
        lo = torch.arange(nb, device=device) * block
        return (values + lo)[None], (values + (lo + block).clamp(max=t) - 1)[None]
    pad = nb * block - t  # repeat the last value: it changes neither end of the last block
    v = torch.cat([values, values[:, -1:].expand(-1, pad)], dim=1) if pad else values
    v = v.reshape(v.shape[0], nb, block)
    return v.amin(dim=-1), v.amax(dim=-1)


def _blockwise_active(mask: AttentionMask, block: int, device) -> torch.Tensor:
    """(Bm, nQb, nKb) bool: the blocks where some pair may be allowed, term by term of the mask
    (ops/masks.py) on each block's ranges: positions through the pattern's `may_attend`, index
    order for causality, document ids (a shared id lies in both ranges), the window or a mark."""
    tq, tk = mask.tq, mask.tk
    qi_lo, qi_hi = _block_ranges(0, tq, block, device)
    kj_lo, _ = _block_ranges(0, tk, block, device)
    q_min, q_max = (x[:, :, None] for x in _block_ranges(mask.q_pos, tq, block, device))
    k_min, k_max = (x[:, None, :] for x in _block_ranges(mask.k_pos, tk, block, device))
    active = mask.pattern.may_attend(q_min, q_max, k_min, k_max)
    if mask.causal:
        active = active & (kj_lo[:, None, :] <= qi_hi[:, :, None] + (tk - tq))
    if mask.q_doc is not None:
        dq_min, dq_max = (x[:, :, None] for x in _block_ranges(mask.q_doc, tq, block, device))
        dk_min, dk_max = (x[:, None, :] for x in _block_ranges(mask.k_doc, tk, block, device))
        active = active & (dq_min <= dk_max) & (dk_min <= dq_max)
    if mask.window is not None:
        near = q_min - k_max < mask.window
        if mask.k_mark is not None:
            near = near | _block_ranges(mask.k_mark.to(torch.int8), tk, block, device)[1].bool()[:, None, :]
        active = active & near
    nqb, nkb = qi_lo.shape[1], kj_lo.shape[1]
    return active.expand(max(active.shape[0], mask.batch), nqb, nkb)


def evaluated_active_blocks(mask: AttentionMask, block: int, device) -> torch.Tensor:
    """(Bm, nQb, nKb) bool: the blocks holding an allowed pair, by evaluating the mask over every
    query x key pair (one slab of queries at a time): the definition the faster forms are
    tested against, and the path for patterns that say nothing about their blocks."""
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
    return torch.cat(active, dim=1)


def _compact(active: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(Bm, nQb, nKb) bool -> kv_idx, valid as `active_kv_blocks` returns them."""
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
# host seconds spent building plans and block masks, and how many, since the last clear: what a
# benchmark reports as each model's first-call cost (a per-row mask builds one every call)
_PLAN_STATS = {"built": 0, "seconds": 0.0}


def plan_stats() -> dict:
    """{"built": plans and block masks built, "seconds": host seconds spent building them} since
    the last `clear_process_caches()` (ops/caches.py)."""
    return dict(_PLAN_STATS)


@contextlib.contextmanager
def _building():
    t0 = time.perf_counter()
    try:
        yield
    finally:
        _PLAN_STATS["built"] += 1
        _PLAN_STATS["seconds"] += time.perf_counter() - t0


def _clear_plans() -> None:
    _PLANS.clear()
    _PLAN_STATS.update(built=0, seconds=0.0)


def _make_plan(mask: AttentionMask, block: int, device) -> BlockPlan:
    with _building():
        return _build_plan(mask, block, device)


def _build_plan(mask: AttentionMask, block: int, device) -> BlockPlan:
    kv_idx, valid = active_kv_blocks(mask, block, device)
    if _band_bounds(mask) is None:  # block ranges may hold empty tiles: keep the tiles with a pair
        kv_idx, valid = _drop_empty_tiles(mask, block, kv_idx, valid)
    bm, nqb, kmax = kv_idx.shape
    qi = torch.arange(nqb * block, device=device).view(1, nqb, block, 1)
    kj = (kv_idx[..., None] * block + torch.arange(block, device=device)).view(bm, nqb, 1, kmax * block)
    allowed = mask(qi.clamp(max=mask.tq - 1), kj.clamp(max=mask.tk - 1))
    allowed = allowed & (kj < mask.tk) & valid.repeat_interleave(block, dim=-1)[:, :, None, :] & (qi < mask.tq)
    seen_any = allowed.any(dim=-1, keepdim=True)
    return BlockPlan(block, kv_idx, allowed | ~seen_any, seen_any)


def _row(mask: AttentionMask, b: int) -> AttentionMask:
    """Row b of a per-row mask, as a mask of batch 1."""
    fields = ("q_pos", "k_pos", "q_doc", "k_doc", "k_mark")
    return replace(mask, **{f: getattr(mask, f)[b : b + 1] for f in fields
                            if isinstance(getattr(mask, f), torch.Tensor) and getattr(mask, f).shape[0] > 1})


def _drop_empty_tiles(mask: AttentionMask, block: int, kv_idx, valid):
    """Evaluate the mask on each candidate (query block, key block) tile alone and keep the tiles
    holding an allowed pair: O(candidate tiles * block^2), and the plan's K shrinks to the exact
    count (a block that straddles two documents whose positions restart would otherwise widen
    every query block's gather to the longest document)."""
    tq, tk = mask.tq, mask.tk
    ar = torch.arange(block, device=kv_idx.device)
    keep = torch.zeros_like(valid)
    per_chunk = max(1, _MAX_SLAB_ELEMENTS // (block * block))
    for b in range(kv_idx.shape[0]):
        row = _row(mask, b) if kv_idx.shape[0] > 1 else mask
        qb, slot = valid[b].nonzero(as_tuple=True)
        for c in range(0, qb.numel(), per_chunk):
            qbc, sc = qb[c : c + per_chunk], slot[c : c + per_chunk]
            qi, kj = qbc[:, None] * block + ar, kv_idx[b, qbc, sc][:, None] * block + ar  # (P, block) each
            m = row(qi.clamp(max=tq - 1)[None, :, :, None], kj.clamp(max=tk - 1)[None, :, None, :])[0]
            m = m & (qi < tq)[:, :, None] & (kj < tk)[:, None, :]
            keep[b, qbc, sc] = m.flatten(1).any(dim=1)
    counts = keep.sum(dim=-1)
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[..., : max(1, int(counts.max()))]
    return kv_idx.gather(-1, order), torch.arange(order.shape[-1], device=keep.device) < counts[..., None]


def block_plan(mask: AttentionMask, block: int, device) -> BlockPlan:
    """The plan for this mask. Contiguous masks are cached until `clear_process_caches()`: every
    layer of a model and every training step sees the same shapes. Per-row masks (positions,
    documents, marks) are planned per call, from block ranges (`active_kv_blocks`): the exact
    mask is evaluated only inside the gathered tiles, never over T x T pairs."""
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
    """Torch backend: gather the touched key blocks per query block, SDPA on (block x K*block);
    a band narrower than the keys (a sliding window on contiguous positions) runs as overlapping
    key windows instead, at close to the pairs it has (ops/band_attention.py)."""
    bounds = _band_bounds(mask)
    if bounds is not None and 0 < bounds[1] - bounds[0] + 1 < mask.tk:
        return band_attention(q, k, v, *bounds, scale=scale)
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

    # 4-d, (B Hkv, nQb, rows, Dh): SDPA on CPU runs its fused flash kernel only on 4-d inputs
    # (5-d ones fall back to the math path, which materialises every block's scores)
    mask4 = allowed[0] if bm == 1 else allowed.repeat_interleave(hkv, dim=0)
    out = F.scaled_dot_product_attention(q_g.flatten(0, 1), k_g.flatten(0, 1), v_g.flatten(0, 1), attn_mask=mask4,
                                         scale=scale)
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
    with _building():
        bm = create_block_mask(mask.mask_mod(device), batch, None, mask.tq, mask.tk, device=device)
    if key is not None:
        _BLOCK_MASKS[key] = bm
        while len(_BLOCK_MASKS) > 16:
            _BLOCK_MASKS.popitem(last=False)
    return bm


register("sparse_attention.plans", _clear_plans, lambda: len(_PLANS))
register("sparse_attention.block_masks", _BLOCK_MASKS.clear, lambda: len(_BLOCK_MASKS))


def _clear_compiled_flex() -> None:
    """Forget the compiled FlexAttention function and what dynamo compiled for it, so the next
    model compiles afresh, as the first one did (other compiled functions recompile too)."""
    if _compiled_flex.cache_info().currsize:
        import torch._dynamo

        _compiled_flex.cache_clear()
        torch._dynamo.reset()


register("sparse_attention.compiled_flex", _clear_compiled_flex, lambda: _compiled_flex.cache_info().currsize)


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
