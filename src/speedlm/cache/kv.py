"""Key/value cache with a retention policy.

The policy decides how many trailing entries stay after each update: all of them (full
attention) or window - 1 (sliding window: the next query sees itself plus window - 1 past
keys), so a window model's cache is O(window) however long it generates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from speedlm.cache.base import LayerCache


@dataclass(frozen=True)
class FullPolicy:
    def keep(self, length: int) -> int:
        return length


@dataclass(frozen=True)
class WindowPolicy:
    window: int

    def keep(self, length: int) -> int:
        return min(length, self.window - 1)


class KVCache(LayerCache):
    """k, v: (B, Hkv, L, Dh) for the L retained positions, which are always the latest L."""

    def __init__(self, policy=FullPolicy()):
        self.policy = policy
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new keys/values; return everything the new queries may need (cache + new),
        then keep only what the policy retains for later calls."""
        if self.k is not None:
            k = torch.cat([self.k, k], dim=2)
            v = torch.cat([self.v, v], dim=2)
        keep = self.policy.keep(k.shape[2])
        if keep < k.shape[2]:
            # clone so the trimmed cache does not pin the untrimmed storage
            self.k, self.v = k[:, :, k.shape[2] - keep :].clone(), v[:, :, v.shape[2] - keep :].clone()
        else:
            self.k, self.v = k, v
        return k, v

    def tensors(self) -> list[torch.Tensor]:
        return [] if self.k is None else [self.k, self.v]
