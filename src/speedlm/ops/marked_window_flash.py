"""Window + marked keys (SepLLM, attention sinks, Longformer's globals) as three fused flash
calls per layer merged by log-sum-exp, for the common case: contiguous positions, no documents,
a Full pattern, on the CPU flash kernel.

Query i sees the keys of its window (a band of key indices, ops/band_attention.py) and the
marked keys left of that window. The marked keys are compacted once (gathered in index order);
query i sees the first c(i) of them, c non-decreasing. Three key sets, disjoint, together exactly
the dense mask's:

1. the band: every query's window, all blocks in one call under one shared band mask;
2. per block of queries (`prefix_block`: about T / 8, at most 1,024), the compacted marked keys
   every query of the block sees (the first min_i c(i)): one call *without a mask*, the kernel's
   fastest form;
3. per sub-block of STAIR_BLOCK (256) queries, the staircase from there to what its last query sees:
   small masked calls.

Each call's output merges into a running (out, lse) in place, as online softmax does:
out = out exp(lse - lse') + o exp(l - lse') with lse' = logaddexp(lse, l). The backward runs each
call's fused backward with the merged output and log-sum-exp (its exact share of the gradient),
folds the band's window gradients back onto the keys and adds the marked keys' gradients at
their indices. Kept for the backward: q, k, v, the output and its log-sum-exp (what full
attention's flash kernel keeps) and the boolean marks; the marks' order and counts are
recomputed in the backward, the band's and prefix's inputs are views or per-call copies. The
16k training step of sepllm-small peaks at full attention's memory (BENCHMARKS.md).

Why not blocks of 128 queries with both parts each (ops/marked_attention.py, the general form,
kept for per-row positions and documents): at 16k that is 256 kernel calls and 128 window masks
per layer, the marked prefix, most of the work, ran under a mask, and the gathered marked keys
were kept for the backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from speedlm.ops.band_attention import BandLayout
from speedlm.ops.masks import AttentionMask, Full
from speedlm.ops.merged_attention import additive_mask

_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

# queries per marked-prefix call, at most: the masked staircase grows with it (its excess over the
# kept pairs is about block / T), the call count shrinks (sepllm-small's heads at 16k, real-text
# marks: 512 -> 704 ms, 1024 -> 642, 2048 -> 613 with twice the staircase)
PREFIX_BLOCK = 1024
MIN_PREFIX_BLOCK = 64
# interior band blocks per call: larger runs call the kernel less often (sepllm-small's band at 16k:
# 87 ms in runs of 16, 66 in runs of 64), the backward's per-window key gradients grow with the run
# (~2.7 MB for 16 blocks at sepllm-small's heads), what the forward allocates per run is a quarter of that
BAND_RUN, BAND_RUN_BACKWARD = 64, 16
# queries per masked staircase call: its excess is about STAIR_BLOCK / 2 x the mark rate keys per
# query; 256 ran 666 ms against 128's 741 (fewer calls; sepllm-small's heads at 16k, medians of 10
# alternating runs)
STAIR_BLOCK = 256


def prefix_block(tq: int) -> int:
    """Queries per marked-prefix call for Tq queries: about Tq / 8, so that the staircase adds
    about an eighth to the marked pairs, within MIN_PREFIX_BLOCK .. PREFIX_BLOCK."""
    return max(MIN_PREFIX_BLOCK, min(PREFIX_BLOCK, tq // 8))


def applies(q: torch.Tensor, mask: AttentionMask) -> bool:
    """Whether this form covers the call: several queries, a KV window over a Full causal
    pattern, int positions, no documents (the CPU flash kernel: the caller checks `can_merge`)."""
    return (
        q.shape[-2] > 1 and mask.causal and mask.window is not None
        and isinstance(mask.pattern, Full) and mask.q_doc is None
        and isinstance(mask.q_pos, int) and isinstance(mask.k_pos, int)
    )


def gather_keys(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D) at key indices idx (1 or B, M), shared or per row -> (B, H, M, D)."""
    if idx.shape[0] == 1:
        return x.index_select(-2, idx[0])
    b, h, _, d = x.shape
    return x.gather(-2, idx[:, None, :, None].expand(b, h, idx.shape[1], d))


class _Plan:
    """The three parts' geometry for one mask: the band, the marked keys' order and the
    per-query count of marked keys left of each window. The latter two are computed in each
    pass (`load`) and dropped after it (`drop`): between the forward and the backward a layer
    keeps only its marks, as full attention keeps nothing."""

    def __init__(self, mask: AttentionMask, tq: int, tk: int, device):
        shift = tk - tq  # causal: query i sees key indices up to i + shift
        lead = mask.q_pos - mask.k_pos  # position offset: query i is at key index i + lead
        self.lo, hi = lead - mask.window + 1, shift  # the window: key indices i + lo .. i + hi
        self.band = BandLayout.of(tq, tk, self.lo, hi) if hi >= self.lo else None
        self.edge = min(self.lo, hi + 1)  # query i's window starts at key index i + edge
        self.marks, self.tq, self.tk, self.device = mask.k_mark, tq, tk, device
        self.order = self.counts = None

    def load(self) -> "_Plan":
        """Computes the marked keys' order and counts (None when no key is marked)."""
        if self.marks is None:
            return self
        before = F.pad(self.marks.long().cumsum(-1), (1, 0))  # (Bm, Tk + 1): marked keys with index < j
        m_max = int(before[:, -1].max())
        if m_max:
            edge = (torch.arange(self.tq, device=self.device) + self.edge).clamp(0, self.tk)
            self.counts = before[:, edge]  # (Bm, Tq): marked keys left of query i's window
            self.order = torch.argsort((~self.marks).to(torch.int8), dim=-1, stable=True)[:, :m_max]  # marked first
        return self

    def drop(self) -> None:
        self.order = self.counts = None

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, Hkv, Tk, D) at the marked keys' indices -> (B, Hkv, M, D)."""
        return gather_keys(x, self.order)

    def scatter_add(self, g: torch.Tensor, out: torch.Tensor, first: int = 0) -> torch.Tensor:
        """The inverse of `gather` for gradients: adds g (B, Hkv, n, D), the gradients of the
        compacted marked keys first .. first + n - 1, into out at their indices, in place."""
        order = self.order[:, first : first + g.shape[-2]]
        if order.shape[0] == 1:
            return out.index_add_(-2, order[0], g)
        b, h, _, d = out.shape
        return out.scatter_add_(-2, order[:, None, :, None].expand(b, h, order.shape[1], d), g)

    def prefix_calls(self, tq: int):
        """The marked keys' calls, (queries s:e, compacted keys a:z, kind, mask (Bm, 1, e - s, z - a)
        or None): per block of `prefix_block` queries the keys every query of the block sees,
        unmasked ("free"), and per sub-block of STAIR_BLOCK queries the rest of what they see,
        masked ("stair"). Calls of one kind cover disjoint queries."""
        if self.counts is None:
            return
        block = prefix_block(tq)
        for s in range(0, tq, block):
            e = min(tq, s + block)
            p0 = int(self.counts[:, s].min())
            if p0:
                yield s, e, 0, p0, "free", None
            for s2 in range(s, e, STAIR_BLOCK):
                e2 = min(e, s2 + STAIR_BLOCK)
                c = self.counts[:, s2:e2]
                p1 = int(c[:, -1].max())
                if p1 > p0:
                    yield s2, e2, p0, p1, "stair", (torch.arange(p0, p1, device=c.device) < c[:, :, None])[:, None]


def _fold_heads(x: torch.Tensor, hkv: int) -> torch.Tensor:
    """(B, H, T, ...) -> (B, Hkv, G T, ...): a key-value head's query groups as one longer block."""
    b, h, t = x.shape[:3]
    return x.reshape(b, hkv, (h // hkv) * t, *x.shape[3:])


def _rows(m: torch.Tensor, groups: int) -> torch.Tensor:
    """A (Bm, 1, rows, keys) mask for queries folded as `_fold_heads` does."""
    return m.repeat(1, 1, groups, 1) if groups > 1 else m


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    """The kernel's log-sum-exp dtype: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _merge_into(out: torch.Tensor, lse: torch.Tensor, o: torch.Tensor, part: torch.Tensor) -> None:
    """Online softmax merge, in place: (out, lse) of the key sets so far and (o, part) of a
    disjoint one -> the union's, for the same rows (lse -inf: saw no key, out 0 there)."""
    new = torch.logaddexp(lse, part)
    safe = torch.where(torch.isfinite(new), new, torch.zeros_like(new))
    out.mul_(torch.exp(lse - safe).unsqueeze(-1).to(out.dtype))
    out.add_(o * torch.exp(part - safe).unsqueeze(-1).to(o.dtype))
    lse.copy_(new)


def _band_calls(lay: BandLayout, groups: int, device, dtype, run: int):
    """The band's calls: (first block, blocks, additive mask, rows that see a key or None). The
    interior blocks share one mask and go in runs of `run` blocks, which bounds what each call
    allocates (the backward's per-window key gradients are span / block x the keys' size)."""
    inside = lay.inside(device).tolist()
    band = None
    i = 0
    while i < lay.nb:
        if inside[i]:
            n = 1
            while n < run and i + n < lay.nb and inside[i + n]:
                n += 1
            if band is None:
                band = additive_mask(lay.band(device).repeat(groups, 1), dtype)
            yield i, n, band, None
        else:  # an edge block: its exact mask
            n = 1
            allowed = lay.edge_mask(torch.tensor([i], device=device)).repeat(1, groups, 1)
            yield i, n, additive_mask(allowed, dtype)[None], allowed.any(-1)
        i += n


class _MarkedWindow(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: _Plan, scale):
        b, h, tq, d = q.shape
        hkv = k.shape[1]
        groups = h // hkv
        # the running output and log-sum-exp over the parts so far (-inf: no key seen yet)
        out = q.new_zeros(b, h, tq, v.shape[-1])
        lse = q.new_full((b, h, tq), float("-inf"), dtype=_lse_dtype(q))
        if plan.band is not None:
            lay = plan.band
            for first, n, m, seen in _band_calls(lay, groups, q.device, q.dtype, BAND_RUN):
                o, l = _FLASH(lay.blocks(q, hkv, first, n), lay.windows(k, first, n), lay.windows(v, first, n),
                              attn_mask=m, scale=scale)
                if seen is not None:
                    l = l.masked_fill(~seen, float("-inf"))
                rows = lay.rows(first, n)
                _merge_into(out[:, :, rows], lse[:, :, rows], lay.unblock(o, b, h, first), lay.unblock(l, b, h, first))
        if plan.load().counts is not None:
            k_m, v_m = plan.gather(k), plan.gather(v)
            for s, e, a, z, _, m in plan.prefix_calls(tq):
                m = None if m is None else _rows(m, groups)
                o, l = _FLASH(_fold_heads(q[:, :, s:e], hkv), k_m[:, :, a:z], v_m[:, :, a:z],
                              attn_mask=None if m is None else additive_mask(m, q.dtype), scale=scale)
                if m is not None:
                    l = l.masked_fill(~m.any(-1), float("-inf"))
                _merge_into(out[:, :, s:e], lse[:, :, s:e], o.reshape(b, h, e - s, -1), l.reshape(b, h, e - s))
        plan.drop()
        lse = lse.masked_fill_(~torch.isfinite(lse), 0.0)  # the backward's convention for rows that see nothing
        ctx.plan, ctx.scale = plan, scale
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        plan, scale = ctx.plan, ctx.scale
        grad = grad.contiguous()
        b, h, tq, d = q.shape
        hkv = k.shape[1]
        groups = h // hkv
        # contiguous whatever the inputs' strides (zeros_like keeps a transposed layout): the band's
        # gradients fold in through a flat view of the keys
        dq, dk, dv = q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
        if plan.band is not None:
            lay = plan.band
            for first, n, m, _ in _band_calls(lay, groups, q.device, q.dtype, BAND_RUN_BACKWARD):
                blocks = torch.arange(first, first + n, device=q.device)
                gq, gk, gv = _FLASH_BACKWARD(
                    lay.blocks(grad, hkv, first, n), lay.blocks(q, hkv, first, n), lay.windows(k, first, n),
                    lay.windows(v, first, n), lay.blocks(out, hkv, first, n), lay.blocks(lse, hkv, first, n),
                    0.0, False,
                    attn_mask=m, scale=scale)
                dq[:, :, lay.rows(first, n)] += lay.unblock(gq, b, h, first)
                lay.fold_windows(gk, blocks, dk)
                lay.fold_windows(gv, blocks, dv)
        if plan.load().counts is not None:
            k_m, v_m = plan.gather(k), plan.gather(v)
            for s, e, a, z, _, m in plan.prefix_calls(tq):
                qb, gb = _fold_heads(q[:, :, s:e], hkv), _fold_heads(grad[:, :, s:e], hkv)
                ob, lb = _fold_heads(out[:, :, s:e], hkv), _fold_heads(lse[:, :, s:e], hkv)
                m = None if m is None else additive_mask(_rows(m, groups), q.dtype)
                gq, gk, gv = _FLASH_BACKWARD(gb, qb, k_m[:, :, a:z], v_m[:, :, a:z], ob, lb, 0.0, False,
                                             attn_mask=m, scale=scale)
                dq[:, :, s:e] += gq.reshape(b, h, e - s, d)
                plan.scatter_add(gk, dk, a)  # straight onto the keys: no compacted gradient is held
                plan.scatter_add(gv, dv, a)
            plan.drop()
        return dq, dk, dv, None, None


def marked_window_flash(q, k, v, mask: AttentionMask, scale: float | None = None) -> torch.Tensor:
    """q (B, H, Tq, Dh), k/v (B, Hkv, Tk, Dh) under `mask` (see `applies`); queries are the last
    Tq keys. Rows that see no key output 0."""
    plan = _Plan(mask, q.shape[-2], k.shape[-2], q.device)
    return _MarkedWindow.apply(q, k, v, plan, scale)


__all__ = ["PREFIX_BLOCK", "applies", "gather_keys", "marked_window_flash", "prefix_block"]
