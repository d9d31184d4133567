"""Attention restricted by a static pattern (a mask function on absolute positions).

Subclasses supply `pattern()` and the KV-cache policy that pattern allows; the backends in
ops/sparse_attention.py (FlexAttention on CUDA, gathered key blocks elsewhere) do the rest.
"""

from __future__ import annotations

from speedlm.cache.kv import WindowPolicy
from speedlm.errors import SpeedlmError
from speedlm.layers.attention import AttentionBase
from speedlm.layers.dims import ModelDims
from speedlm.ops.masks import SlidingWindow
from speedlm.ops.sparse_attention import dense_mask, sparse_attention


class SparseAttention(AttentionBase):
    backend: str = "auto"

    def pattern(self):
        raise NotImplementedError

    def _attend(self, q, k, v, q_start, kv_start):
        return sparse_attention(q, k, v, self.pattern(), q_start, kv_start, backend=self.backend)

    def _reference_mask(self, t, start, device):
        return dense_mask(self.pattern(), t, t, start, start, device)


class SlidingWindowAttention(SparseAttention):
    """Each query sees itself and the `window - 1` previous tokens (Longformer's local band,
    Mistral's SWA). Cache: the last window - 1 keys, whatever the context length."""

    def __init__(self, dims: ModelDims, window: int = 256, kv_heads: int | None = None):
        super().__init__(dims, kv_heads)
        if window < 1:
            raise SpeedlmError(f"window must be >= 1, got {window}")
        self.window = window
        self._pattern = SlidingWindow(window)

    def pattern(self):
        return self._pattern

    def _cache_policy(self):
        return WindowPolicy(self.window)

    def _mean_keys(self, context_len: int) -> float:
        w, n = self.window, context_len
        # positions 0..w-1 see i+1 keys, the rest see w
        ramp = min(n, w)
        return (ramp * (ramp + 1) / 2 + max(0, n - w) * w) / n
