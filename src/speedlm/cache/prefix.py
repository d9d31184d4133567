"""`PrefixCache`: the keys and values of a frozen prefix for bidirectional calls (masked
diffusion's approximate KV cache, Fast-dLLM; Wu et al. 2025, arXiv:2505.22618).

Two phases. Recording: one bidirectional call over the whole sequence stores every position's
keys and values as it attends normally. `keep_prefix(n)` then keeps the first n positions
(the prompt and the finished blocks) and freezes the cache. Frozen: a bidirectional call over
the positions after the prefix attends to the frozen keys and to its own, and stores nothing.
The prefix's keys are not updated as later positions change: the approximation that saves
re-reading the prefix at every denoising step.
"""

from __future__ import annotations

import torch

from speedlm.cache.base import LayerCache


class PrefixCache(LayerCache):
    serves_bidirectional = True

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.frozen = False

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[-2]

    def keep_prefix(self, n: int) -> None:
        self.k, self.v = self.k[..., :n, :], self.v[..., :n, :]
        self.frozen = True

    def bidirectional_keys(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Recording: store this call's keys and values and read them. Frozen: the prefix's keys
        and values followed by this call's."""
        if not self.frozen:
            self.k, self.v = k, v
            return k, v
        return torch.cat([self.k, k], dim=-2), torch.cat([self.v, v], dim=-2)

    def kv_slots(self) -> list[float]:
        return [self.length]

    def tensors(self) -> list[torch.Tensor]:
        return [] if self.k is None else [self.k, self.v]

    def detach(self) -> None:
        if self.k is not None:
            self.k, self.v = self.k.detach(), self.v.detach()
