"""Initialisers that several mixers share, so that one paper's recipe is written once.

The state-space decays (Mamba, Mamba-2, Gated DeltaNet, and Hymba through Mamba) follow the
Mamba papers' code: the step dt ~ logU[1e-3, 1e-1], floored at 1e-4, stored as the bias that
softplus maps back to it; Mamba-2 and Gated DeltaNet store A ~ U[1, 16] as A_log. The draws are
in float64 and copied into the parameter, whatever its dtype.
"""

from __future__ import annotations

import math

import torch

DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 1e-1, 1e-4


def inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    """x with softplus(x) = y, for y > 0 (log(expm1(y)) written to stay finite for small y)."""
    return y + torch.log(-torch.expm1(-y))


def init_dt_bias(bias: torch.Tensor, dt_min: float = DT_MIN, dt_max: float = DT_MAX, floor: float = DT_FLOOR) -> None:
    """softplus^-1 of dt ~ logU[dt_min, dt_max] floored at `floor`, in place."""
    with torch.no_grad():
        u = torch.rand(bias.shape, dtype=torch.float64) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        bias.copy_(inverse_softplus(torch.exp(u).clamp_min(floor)))


def init_a_log(a_log: torch.Tensor, low: float = 1.0, high: float = 16.0) -> None:
    """log of A ~ U[low, high], in place (the decay is -exp(A_log))."""
    with torch.no_grad():
        a_log.copy_(torch.log(torch.empty(a_log.shape, dtype=torch.float64).uniform_(low, high)))
