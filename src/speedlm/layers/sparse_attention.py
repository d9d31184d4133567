"""Attention restricted by a static pattern (a mask function on absolute positions).

A new static sparse mechanism is a pattern (ops/masks.py) plus a subclass of `AttentionBase`
that returns it and says which KV policy it allows; the backends in ops/sparse_attention.py
(FlexAttention on CUDA, gathered key blocks elsewhere), the KV cache, bidirectional mode and
the reference come with it.
"""

from __future__ import annotations

from typing import Annotated

import torch

from speedlm.cache.kv import WindowPolicy
from speedlm.errors import SpeedlmError
from speedlm.layers.attention import AttentionBase
from speedlm.layers.dims import ModelDims
from speedlm.ops.dilated_attention import DilatedWindow
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


class DilatedWindowAttention(AttentionBase):
    """Dilated sliding window (Longformer): each causal query sees the keys at distances 0, d,
    ..., (window - 1) * d, with a dilation d per head (`dilation`: one int, or one per head;
    heads that share a KV head share their dilation). Reach (window - 1) * max(d) for window
    keys per query; runs as d sliding windows on residue classes (ops/dilated_attention.py).
    Cache: the last (window - 1) * max(d) keys."""

    @classmethod
    def check_options(cls, dims: ModelDims, window: int = 64, dilation: int | list[int] = 2,
                      kv_heads: int | None = None, **options) -> None:
        super().check_options(dims, kv_heads=kv_heads)
        if not isinstance(dilation, list):
            if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
                raise SpeedlmError(f"dilation must be an integer >= 1 or one per head, got {dilation!r}")
        else:
            if len(dilation) != dims.n_heads or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dilation):
                raise SpeedlmError(f"dilation must be one positive int per head ({dims.n_heads}), got {dilation}")
            per_kv = dims.n_heads // (kv_heads or dims.n_heads)
            if any(len(set(dilation[g : g + per_kv])) > 1 for g in range(0, dims.n_heads, per_kv)):
                raise SpeedlmError("heads that share a KV head must share their dilation")

    def __init__(
        self,
        dims: ModelDims,
        window: Annotated[int, Range(min=1)] = 64,
        dilation: int | list[int] = 2,
        kv_heads: Annotated[int | None, Range(min=1)] = None,
    ):
        super().__init__(dims, kv_heads)
        self.window = window
        self.dilations = list(dilation) if isinstance(dilation, list) else [dilation] * dims.n_heads
        by_dilation: dict[int, list[int]] = {}
        for h, d in enumerate(self.dilations):
            by_dilation.setdefault(d, []).append(h)
        self._groups = [(heads, DilatedWindow(window, d)) for d, heads in sorted(by_dilation.items())]
        self.reset_parameters()

    def pattern(self):
        return self._groups[0][1] if len(self._groups) == 1 else None

    def head_patterns(self):
        return None if len(self._groups) == 1 else self._groups

    def reach(self) -> int:
        """How far back the furthest key is: (window - 1) * the largest dilation."""
        return (self.window - 1) * max(self.dilations)

    def default_policy(self):
        return WindowPolicy(self.reach() + 1)

    def max_context(self, kv_policy=None):
        return None  # no query looks further back than the reach, whatever the cache keeps

    def _mean_keys(self, context_len: int) -> float:
        n = context_len
        per_head = []
        for d in self.dilations:  # position i sees min(window, i // d + 1) keys
            i = torch.arange(n, dtype=torch.float64)
            per_head.append(torch.clamp(torch.div(i, d, rounding_mode="floor") + 1, max=self.window).mean().item())
        return sum(per_head) / len(per_head)
