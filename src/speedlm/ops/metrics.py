"""Closeness metric shared by every equivalence test: relative RMS error."""

import torch


def rel_rms_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected||_2 / ||expected||_2, computed in float64.

    Bare atol hides errors on small outputs and over-penalises large ones; a relative
    norm is comparable across shapes, lengths and dtypes.
    """
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    denom = e.norm().clamp_min(1e-30)
    return float((a - e).norm() / denom)
