"""Cache protocol shared by every layer type, and the model-level list of layer caches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch


class LayerCache:
    """State one layer carries between calls. Subclasses hold tensors; `nbytes` reports them,
    `kv_slots` the key/value slots among them."""

    # bidirectional calls may pass this cache (a frozen prefix's keys: masked diffusion's
    # PrefixCache), to mixers and blocks that declare `supports_prefix_cache`
    serves_bidirectional: ClassVar[bool] = False

    def tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def kv_slots(self) -> list[float]:
        """Key/value slots held, one entry per KV cache inside this layer's state (none for a
        recurrent or convolution state): what a KV ratio counts."""
        return []

    def summary(self) -> dict:
        """What the tokens seen so far made of this state, where that depends on the tokens
        (Mixture-of-Depths: the share it routed), for reports; empty otherwise."""
        return {}

    def bidirectional_keys(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For a bidirectional call over (rotated) keys and values: what its queries read."""
        raise NotImplementedError

    def detach(self) -> None:
        """Cut the autograd history of the held state (segment memory in training: the next
        segment reads this state but does not backpropagate into the previous one)."""
        raise NotImplementedError

    def reserve(self, tokens: int) -> None:
        """Hint: this cache will see `tokens` tokens in all. A cache whose buffers grow allocates
        what its policy will retain of them up front, so their shapes stop changing (compiled
        decoding recompiles on every shape change, generate/compiled.py); others ignore it."""


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

    def kv_slots(self) -> list[float]:
        """KV slots held by every KV cache of every layer (composite and routed layers included)."""
        return [n for c in self.layers for n in c.kv_slots()]

    def detach(self) -> None:
        for c in self.layers:
            c.detach()

    def reserve(self, tokens: int) -> None:
        """`LayerCache.reserve` for every layer."""
        for c in self.layers:
            c.reserve(tokens)
