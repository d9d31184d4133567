"""Two conventions every attention-like op shares: the default query scale and the zero
(B, H, Dk, Dv) matrix state of the linear-recurrent ops (linear attention, GLA, delta rule)."""

from __future__ import annotations

import torch


def query_scale(q: torch.Tensor, scale: float | None) -> float:
    """`scale`, or 1/sqrt(Dk) for queries q (..., Dk) when it is None."""
    return q.shape[-1] ** -0.5 if scale is None else scale


def zero_matrix_state(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Zeros (B, H, Dk, Dv) like q (B, H, T, Dk), for values v (..., Dv): the state before any token."""
    b, h, _, dk = q.shape
    return q.new_zeros(b, h, dk, v.shape[-1])
