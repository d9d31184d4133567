"""Cache protocol shared by every layer type, and the model-level list of layer caches."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class LayerCache:
    """State one mixer carries between calls. Subclasses hold tensors; `nbytes` reports them."""

    def tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


@dataclass
class ModelCache:
    """One LayerCache per layer, plus how many tokens the model has consumed so far.

    `seen` is the absolute position of the next token; every layer agrees on it, so it lives
    here once rather than in each layer.
    """

    layers: list[LayerCache]
    seen: int = 0
    extra: dict = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.layers)
