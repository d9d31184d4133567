"""A layer with several kinds of state (Mamba: conv inputs + SSM state; Hymba: KV + SSM state;
a causal-conv block + attention) holds one `CompositeCache`; the model's cache stays a list of
layer caches."""

from __future__ import annotations

import torch

from speedlm.cache.base import LayerCache


class CompositeCache(LayerCache):
    def __init__(self, **parts: LayerCache):
        self.parts = parts

    def __getitem__(self, name: str) -> LayerCache:
        return self.parts[name]

    def tensors(self) -> list[torch.Tensor]:
        return [t for p in self.parts.values() for t in p.tensors()]

    def kv_slots(self) -> list[float]:
        return [n for p in self.parts.values() for n in p.kv_slots()]

    def summary(self) -> dict:
        return {k: v for p in self.parts.values() for k, v in p.summary().items()}

    def detach(self) -> None:
        for p in self.parts.values():
            p.detach()

    def reserve(self, tokens: int) -> None:
        for p in self.parts.values():
            p.reserve(tokens)
