"""Attention restricted by a static pattern (a mask function on absolute positions).

A new static sparse mechanism is a pattern (ops/masks.py) plus a subclass of `AttentionBase`
that returns it and says which KV policy it allows; the backends in ops/sparse_attention.py
(FlexAttention on CUDA, gathered key blocks elsewhere), the KV cache, bidirectional mode and
the reference come with it.
"""

from __future__ import annotations

from typing import Annotated

from speedlm.cache.kv import WindowPolicy
from speedlm.layers.attention import AttentionBase
from speedlm.layers.dims import ModelDims
from speedlm.ops.masks import SlidingWindow
from speedlm.registry import Range


class SlidingWindowAttention(AttentionBase):
    """Each causal query sees itself and the `window - 1` previous tokens (Longformer's local
    band, Mistral's SWA); a bidirectional one sees window - 1 tokens on either side. Cache: the
    last window - 1 keys, whatever the context length."""

    def __init__(
        self,
        dims: ModelDims,
        window: Annotated[int, Range(min=1)] = 256,
        kv_heads: Annotated[int | None, Range(min=1)] = None,
    ):
        super().__init__(dims, kv_heads)
        self.window = window
        self._pattern = SlidingWindow(window)
        self.reset_parameters()

    def pattern(self):
        return self._pattern

    def default_policy(self):
        return WindowPolicy(self.window)

    def max_context(self, kv_policy=None):
        return None  # no query looks further back than the window, whatever the cache keeps

    def _mean_keys(self, context_len: int) -> float:
        w, n = self.window, context_len
        # positions 0..w-1 see i+1 keys, the rest see w
        ramp = min(n, w)
        return (ramp * (ramp + 1) / 2 + max(0, n - w) * w) / n
