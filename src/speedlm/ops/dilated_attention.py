"""Dilated sliding window (Longformer, Beltagy et al. 2020, arXiv:2004.05150): a query sees the
keys at distances 0, d, 2d, ..., (window - 1) * d (both sides when bidirectional).

The gathered-block plan wastes work on it: every key block inside the window * d span holds
some allowed key, so the plan would touch window * d keys per query for window useful ones.
The exact better plan: keys a query may see share its residue modulo d, and within one residue
class the pattern is a plain sliding window of `window` on the compacted positions (p // d).
So the op runs d sliding-window attentions on the strided slices x[r::d], each O(T/d * window):
O(T * window) in all, like the undilated window. That plan needs contiguous positions (int
offsets, no documents or marks); other masks take the generic sparse path with the pattern.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from speedlm.ops.masks import AttentionMask, SlidingWindow


@dataclass(frozen=True)
class DilatedWindow:
    window: int
    dilation: int = 1

    def __call__(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        d = q_pos - k_pos
        return (d.abs() < self.window * self.dilation) & (d.remainder(self.dilation) == 0)

    def max_distance(self) -> int:
        return (self.window - 1) * self.dilation

    def may_attend(self, q_min, q_max, k_min, k_max) -> torch.Tensor:
        """Some distance of the ranges is a multiple of the dilation within the reach (ops/masks.py)."""
        reach = self.max_distance()
        lo, hi = (q_min - k_max).clamp(min=-reach), (q_max - k_min).clamp(max=reach)
        return (lo <= hi) & (torch.div(hi, self.dilation, rounding_mode="floor") * self.dilation >= lo)

    def plan(self, q, k, v, mask: AttentionMask, scale=None, backend: str = "auto"):
        """The residue-class plan (see the module docstring), for contiguous masks."""
        return dilated_window_attention(q, k, v, mask, scale, backend)


def dilated_window_attention(q, k, v, mask: AttentionMask, scale=None, backend: str = "auto") -> torch.Tensor:
    from speedlm.ops.attention import attention

    pattern: DilatedWindow = mask.pattern
    assert mask.contiguous, "the residue plan needs contiguous positions"
    mask = replace(mask, window=None)  # any window left here is wider than the pattern's reach
    d = pattern.dilation
    out = q.new_zeros(*q.shape[:-1], v.shape[-1])
    local = SlidingWindow(pattern.window)
    for r in range(d):
        i0, j0 = (r - mask.q_pos) % d, (r - mask.k_pos) % d  # first query / key index of residue r
        if i0 >= mask.tq or j0 >= mask.tk:
            continue
        qs, ks, vs = (t[..., s::d, :].contiguous() for t, s in ((q, i0), (k, j0), (v, j0)))
        sub = replace(
            mask, pattern=local, tq=qs.shape[-2], tk=ks.shape[-2],
            q_pos=(mask.q_pos + i0) // d, k_pos=(mask.k_pos + j0) // d,
        )
        out[..., i0::d, :] = attention(qs, ks, vs, sub, scale, backend)
    return out
