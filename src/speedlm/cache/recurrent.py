"""Fixed-size recurrent state (matrix state of linear attention, SSM state, ...)."""

from __future__ import annotations

import torch

from speedlm.cache.base import LayerCache


class RecurrentState(LayerCache):
    """Holds a tuple of tensors whose size does not grow with context; None before the first call.

    The state is accumulated in float32 whatever the activation dtype (float64 in float64 runs):
    a bfloat16 state drifts over a long decode (the error of every update is kept forever),
    while the parallel form rounds once. Mixers compute their recurrences in `dtype_for(x)`.
    """

    def __init__(self):
        self.state: tuple[torch.Tensor, ...] | None = None

    @staticmethod
    def dtype_for(dtype: torch.dtype) -> torch.dtype:
        return torch.float64 if dtype == torch.float64 else torch.float32

    @staticmethod
    def bytes_per_elem(activation_bytes: int) -> int:
        """What a state element costs when activations take `activation_bytes` (>= float32)."""
        return max(activation_bytes, 4)

    def tensors(self) -> list[torch.Tensor]:
        return [] if self.state is None else list(self.state)

    def detach(self) -> None:
        if self.state is not None:
            self.state = tuple(s.detach() for s in self.state)
