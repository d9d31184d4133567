"""Fixed-size recurrent state (matrix state of linear attention, SSM state, ...)."""

from __future__ import annotations

import torch

from speedlm.cache.base import LayerCache


class RecurrentState(LayerCache):
    """Holds a tuple of tensors whose size does not grow with context; None before the first call."""

    def __init__(self):
        self.state: tuple[torch.Tensor, ...] | None = None

    def tensors(self) -> list[torch.Tensor]:
        return [] if self.state is None else list(self.state)
