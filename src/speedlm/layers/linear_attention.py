"""Linear attention mixer (elu + 1 features), causal with a matrix-state cache, or bidirectional."""

from __future__ import annotations

from typing import Annotated

from speedlm.cache.recurrent import RecurrentState
from speedlm.layers.dims import ModelDims
from speedlm.layers.flops import Flops, attention_flops, chunk_visible_keys
from speedlm.layers.heads import HeadsMixer
from speedlm.layers.mixer import SeqMeta
from speedlm.ops.linear_attention import (
    elu_feature_map,
    linear_attention_bidirectional,
    linear_attention_chunked,
    linear_attention_dense,
    linear_attention_recurrent,
)
from speedlm.registry import Range


class LinearAttention(HeadsMixer):
    """Katharopoulos et al. 2020. State per head: S (Dk x Dv) and z (Dk): O(1) in context, kept in
    float32 whatever the activation dtype (see RecurrentState)."""

    supports_bidirectional = True

    def __init__(self, dims: ModelDims, chunk_size: Annotated[int, Range(min=1)] = 64, normalize: bool = True):
        super().__init__(dims)
        self.chunk_size, self.normalize = chunk_size, normalize
        self.reset_parameters()

    def _features(self, q, k, v, dtype):
        q, k = elu_feature_map(q), elu_feature_map(k)
        if q.dtype != dtype:  # bf16 / fp16 activations: the recurrence runs in float32
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        return q, k, v

    def mix(self, x, meta: SeqMeta, cache: RecurrentState | None = None):
        q, k, v = self._features(*self.project(x), RecurrentState.dtype_for(x.dtype))
        if not meta.causal:
            y = linear_attention_bidirectional(q, k, v, self.normalize)
        else:
            init = None if cache is None else cache.state
            y, state = linear_attention_chunked(q, k, v, init, self.normalize, chunk_size=self.chunk_size)
            if cache is not None:
                cache.state = state
        return self.output(y if y.dtype == x.dtype else y.to(x.dtype))

    def reference(self, x, meta: SeqMeta):
        q, k, v = self._features(*self.reference_project(x), x.dtype)
        if meta.causal:
            y = linear_attention_recurrent(q, k, v, None, self.normalize)[0]
        else:
            y = linear_attention_dense(q, k, v, causal=False, normalize=self.normalize)
        return self.reference_output(y)

    def init_cache(self, kv_policy=None) -> RecurrentState:
        return RecurrentState()

    def state_bytes(self, context_len: int, batch_size: int = 1, bytes_per_elem: int = 2) -> int:
        elems = batch_size * self.n_heads * (self.head_dim * self.head_dim + self.head_dim)
        return elems * RecurrentState.bytes_per_elem(bytes_per_elem)

    def flops_breakdown(self, context_len: int, causal: bool = True) -> Flops:
        dk = dv = self.head_dim
        if not causal:  # every query reads the whole state: k^T v, q S, and its normaliser q . sum(k)
            return Flops(linear=self.projection_flops(), matmul=self.n_heads * 4 * dk * dv,
                         other=self.n_heads * 2 * dk if self.normalize else 0.0)
        dv += 1 if self.normalize else 0  # the normaliser rides along as one more value channel
        # chunked form: the causal half of each C x C chunk (scores, mix), the carried state
        # read (q S) and the chunk's state (k^T v)
        per_head = attention_flops(1, chunk_visible_keys(context_len, self.chunk_size), dk, dv) + 4 * dk * dv
        return Flops(linear=self.projection_flops(), matmul=self.n_heads * per_head)
