"""Based (Arora et al. 2024, arXiv:2402.18668): linear attention with a second-order Taylor
feature map on a small projected dimension, meant to sit next to short sliding-window attention
and gated short convolutions (the `based` preset's layer pattern).

    phi(x) = [1, x / d^(1/4), vec(x x^T) / (sqrt(2) sqrt(d))]    x in R^d, d = feature_dim (16)

so phi(q) . phi(k) = 1 + q.k / sqrt(d) + (q.k)^2 / (2 d), the Taylor expansion of
exp(q.k / sqrt(d)) to second order: always positive, so the normalised form is safe. Queries and
keys are projected to `feature_dim` per head; each head's state is (1 + d + d^2) x Dh.
"""

from __future__ import annotations

from typing import Annotated

import torch

from speedlm.cache.recurrent import RecurrentState
from speedlm.layers.dims import ModelDims
from speedlm.layers.flops import Flops, attention_flops, chunk_visible_keys
from speedlm.layers.heads import HeadsMixer
from speedlm.layers.mixer import SeqMeta
from speedlm.ops.linear_attention import (
    linear_attention_bidirectional,
    linear_attention_chunked,
    linear_attention_dense,
    linear_attention_recurrent,
)
from speedlm.registry import Range


def taylor_features(x: torch.Tensor) -> torch.Tensor:
    """(..., d) -> (..., 1 + d + d^2): the second-order Taylor feature map above."""
    d = x.shape[-1]
    outer = (x[..., :, None] * x[..., None, :]).flatten(-2) / (2.0**0.5 * d**0.5)
    return torch.cat([torch.ones_like(x[..., :1]), x / d**0.25, outer], dim=-1)


def taylor_features_reference(x: torch.Tensor) -> torch.Tensor:
    """The same map written entry by entry (for the reference path)."""
    d = x.shape[-1]
    second = torch.einsum("...i,...j->...ij", x, x).reshape(*x.shape[:-1], d * d) * (0.5 / d) ** 0.5
    return torch.cat([x.new_ones(*x.shape[:-1], 1), x * d**-0.25, second], dim=-1)


class BasedLinearAttention(HeadsMixer):
    supports_bidirectional = True

    def __init__(
        self,
        dims: ModelDims,
        feature_dim: Annotated[int, Range(min=1)] = 16,
        chunk_size: Annotated[int, Range(min=1)] = 64,
    ):
        super().__init__(dims, None, key_dim=feature_dim, value_dim=dims.head_dim)
        self.feature_dim, self.chunk_size = feature_dim, chunk_size
        self.reset_parameters()

    @property
    def n_features(self) -> int:
        return 1 + self.feature_dim + self.feature_dim**2

    def mix(self, x, meta: SeqMeta, cache: RecurrentState | None = None):
        q, k, v = self.project(x)
        dt = RecurrentState.dtype_for(x.dtype)
        qf, kf, v = taylor_features(q.to(dt)), taylor_features(k.to(dt)), v.to(dt)
        if not meta.causal:
            y = linear_attention_bidirectional(qf, kf, v)
        else:
            init = None if cache is None else cache.state
            y, state = linear_attention_chunked(qf, kf, v, init, chunk_size=self.chunk_size)
            if cache is not None:
                cache.state = state
        return self.output(y.to(x.dtype))

    def reference(self, x, meta: SeqMeta):
        q, k, v = self.reference_project(x)
        qf, kf = taylor_features_reference(q), taylor_features_reference(k)
        y = linear_attention_recurrent(qf, kf, v)[0] if meta.causal else linear_attention_dense(qf, kf, v, causal=False)
        return self.reference_output(y)

    def init_cache(self, kv_policy=None):
        return RecurrentState()

    def state_bytes(self, context_len: int, batch_size: int = 1, bytes_per_elem: int = 2) -> int:
        elems = batch_size * self.n_heads * (self.n_features * self.value_dim + self.n_features)
        return elems * RecurrentState.bytes_per_elem(bytes_per_elem)

    def flops_breakdown(self, context_len: int, causal: bool = True) -> Flops:
        f, dv = self.n_features, self.value_dim
        features = self.n_heads * 2 * 2 * f  # the Taylor map of queries and keys (outer product, scale): elementwise
        if not causal:  # phi(k)^T v, phi(q) times that; the normaliser phi(q) . sum phi(k)
            return Flops(linear=self.projection_flops(), matmul=self.n_heads * 4 * f * dv,
                         other=features + self.n_heads * 2 * f)
        dv += 1  # the normaliser rides along as one more value channel
        # the causal half of each C x C chunk (scores over the features, mix), state read and chunk state
        per_head = attention_flops(1, chunk_visible_keys(context_len, self.chunk_size), f, dv) + 4 * f * dv
        return Flops(linear=self.projection_flops(), matmul=self.n_heads * per_head, other=features)
