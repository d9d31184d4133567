"""Performer (Choromanski et al. 2020, arXiv:2009.14794): softmax attention approximated with
FAVOR+ positive orthogonal random features, linear in length (ops/performer.py).

The random projection (m x Dh, shared by the heads as in the paper's code) is a persistent
buffer: drawn by `reset_parameters`, saved with the weights, so a loaded checkpoint computes
the same function. With `redraw_interval` set, training draws new features every that many
optimizer steps (the paper's feature redrawing), between steps (layers/step_hooks.py), never
inside a forward: a forward recomputed in the backward pass (activation checkpointing,
reversible layers) then uses the features its forward used. Evaluation and decoding never
redraw, since a cached state is only meaningful under the features that built it. Default
m = Dh ln Dh.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch

from speedlm.cache.recurrent import RecurrentState
from speedlm.layers.dims import ModelDims
from speedlm.layers.flops import Flops, attention_flops, chunk_visible_keys
from speedlm.layers.heads import HeadsMixer
from speedlm.layers.mixer import SeqMeta
from speedlm.layers.step_hooks import AfterOptimizerStep
from speedlm.ops.performer import favor_bidirectional, favor_chunked, favor_features, orthogonal_gaussian
from speedlm.registry import Range


def default_features(head_dim: int) -> int:
    return max(1, round(head_dim * math.log(head_dim)))


class Performer(HeadsMixer, AfterOptimizerStep):
    supports_bidirectional = True

    def __init__(
        self,
        dims: ModelDims,
        features: Annotated[int | None, Range(min=1)] = None,
        redraw_interval: Annotated[int | None, Range(min=1)] = None,
        chunk_size: Annotated[int, Range(min=1)] = 64,
    ):
        super().__init__(dims)
        self.features = default_features(self.head_dim) if features is None else features
        self.redraw_interval, self.chunk_size = redraw_interval, chunk_size
        self.register_buffer("projection", torch.empty(self.features, self.head_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self.redraw()

    def redraw(self) -> None:
        """New random features (from torch's global generator, so seeded runs repeat)."""
        with torch.no_grad():
            w = orthogonal_gaussian(self.features, self.head_dim, dtype=torch.float64)
            self.projection.copy_(w.to(self.projection.dtype))

    def after_optimizer_step(self, step: int) -> None:
        if self.redraw_interval is not None and step % self.redraw_interval == 0:
            self.redraw()

    def mix(self, x, meta: SeqMeta, cache: RecurrentState | None = None):
        q, k, v = self.project(x)
        dt = RecurrentState.dtype_for(x.dtype)
        w = self.projection.to(dt)
        qf, _ = favor_features(q.to(dt), w)
        kf, ka = favor_features(k.to(dt), w)
        v = v.to(dt)
        if not meta.causal:
            y = favor_bidirectional(qf, kf, ka, v)
        else:
            init = None if cache is None else cache.state
            y, state = favor_chunked(qf, kf, ka, v, init, chunk_size=self.chunk_size)
            if cache is not None:
                cache.state = state
        return self.output(y.to(x.dtype))

    def reference(self, x, meta: SeqMeta):
        """FAVOR+ positive random features written from the paper, not through `favor_features`: with
        u = x / Dh^(1/4), phi(u) = exp(W u - |u|^2 / 2) / sqrt(m), A = phi(Q) phi(K)^T (s <= t when
        causal) and o_t = sum_s A_ts v_s / sum_s A_ts. No stabiliser: in float64 exp stays finite,
        and the fast path's per-token log scales cancel exactly in this ratio."""
        q, k, v = self.reference_project(x)
        w = self.projection.to(x.dtype)
        m, dh = w.shape

        def phi(u):  # (B, H, T, Dh) -> (B, H, T, m)
            u = u / dh**0.25
            return torch.exp(torch.einsum("bhtd,md->bhtm", u, w) - 0.5 * (u * u).sum(-1, keepdim=True)) / math.sqrt(m)

        scores = torch.einsum("bhtm,bhsm->bhts", phi(q), phi(k))
        if meta.causal:
            t = x.shape[1]
            scores = scores * torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        y = (scores @ v) / scores.sum(-1, keepdim=True)
        return self.reference_output(y)

    def init_cache(self, kv_policy=None):
        return RecurrentState()

    def state_bytes(self, context_len: int, batch_size: int = 1, bytes_per_elem: int = 2) -> int:
        elems = batch_size * self.n_heads * (self.features * self.head_dim + self.features + 1)
        return elems * RecurrentState.bytes_per_elem(bytes_per_elem)

    def flops_breakdown(self, context_len: int, causal: bool = True) -> Flops:
        m, dh = self.features, self.head_dim
        features = 2 * 2 * m * dh  # queries and keys through the random projection
        if not causal:  # phi(k)^T v, phi(q) times that; the normaliser phi(q) . sum phi(k)
            return Flops(linear=self.projection_flops(), matmul=self.n_heads * (features + 4 * m * dh),
                         other=self.n_heads * 2 * m)
        dv = dh + 1  # the normaliser rides along as one more value channel
        # the causal half of each C x C chunk (scores over m features, mix), the chunk's sums and the carried state read
        per_head = features + attention_flops(1, chunk_visible_keys(context_len, self.chunk_size), m, dv) + 4 * m * dv
        return Flops(linear=self.projection_flops(), matmul=self.n_heads * per_head)
