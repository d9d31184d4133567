"""Static attention patterns as mask functions on absolute positions (see sparse_attention)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SlidingWindow:
    """Causal sliding window: a query sees itself and the window - 1 keys before it.

    Frozen (hashable by value) so block masks can be cached per pattern.
    """

    window: int

    def __call__(self, q_pos: torch.Tensor, kv_pos: torch.Tensor) -> torch.Tensor:
        return (kv_pos <= q_pos) & (q_pos - kv_pos < self.window)


@dataclass(frozen=True)
class Causal:
    def __call__(self, q_pos: torch.Tensor, kv_pos: torch.Tensor) -> torch.Tensor:
        return kv_pos <= q_pos
