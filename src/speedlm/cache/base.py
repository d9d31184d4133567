"""Cache protocol shared by every layer type, and the model-level list of layer caches."""

from __future__ import annotations

from dataclasses import dataclass

import torch


class LayerCache:
    """State one layer carries between calls. Subclasses hold tensors; `nbytes` reports them."""

    def tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def detach(self) -> None:
        """Cut the autograd history of the held state (segment memory in training: the next
        segment reads this state but does not backpropagate into the previous one)."""
        raise NotImplementedError


@dataclass
class ModelCache:
    """One LayerCache per layer, plus how many tokens the model has consumed so far.

    `seen` is the index of the next token; every layer agrees on it, so it lives here once
    rather than in each layer. `max_context` is the longest sequence these caches can serve
    (None: bounded caches, no limit), decided when the cache was made.
    """

    layers: list[LayerCache]
    seen: int = 0
    max_context: int | None = None

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.layers)

    def detach(self) -> None:
        for c in self.layers:
            c.detach()
