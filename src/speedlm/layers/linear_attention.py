"""Causal linear attention mixer (elu + 1 features) with a matrix-state cache."""

from __future__ import annotations

from torch import nn

from speedlm.cache.recurrent import RecurrentState
from speedlm.layers.dims import ModelDims
from speedlm.layers.mixer import Mixer, SeqMeta, linear_flops
from speedlm.ops.linear_attention import elu_feature_map, linear_attention_chunked, linear_attention_recurrent


class LinearAttention(Mixer):
    """Katharopoulos et al. 2020. State per head: S (Dk x Dv) and z (Dk): O(1) in context."""

    def __init__(self, dims: ModelDims, chunk_size: int = 64, normalize: bool = True):
        super().__init__()
        self.n_heads, self.head_dim = dims.n_heads, dims.head_dim
        self.chunk_size, self.normalize = chunk_size, normalize
        d = dims.d_model
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def _qkv(self, x):
        b, t, _ = x.shape
        split = lambda y: y.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # noqa: E731
        q = elu_feature_map(split(self.q_proj(x)))
        k = elu_feature_map(split(self.k_proj(x)))
        return q, k, split(self.v_proj(x))

    def _out(self, y):
        b, _, t, _ = y.shape
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))

    def forward(self, x, meta: SeqMeta, cache: RecurrentState | None = None):
        q, k, v = self._qkv(x)
        init = None if cache is None else cache.state
        y, state = linear_attention_chunked(q, k, v, init, self.normalize, chunk_size=self.chunk_size)
        if cache is not None:
            cache.state = state
        return self._out(y)

    def reference(self, x, meta: SeqMeta):
        q, k, v = self._qkv(x)
        return self._out(linear_attention_recurrent(q, k, v, None, self.normalize)[0])

    def init_cache(self) -> RecurrentState:
        return RecurrentState()

    def state_bytes(self, context_len: int, batch_size: int = 1, bytes_per_elem: int = 2) -> int:
        return batch_size * self.n_heads * (self.head_dim * self.head_dim + self.head_dim) * bytes_per_elem

    def flops_per_token(self, context_len: int) -> float:
        proj = linear_flops(self.q_proj, self.k_proj, self.v_proj, self.o_proj)
        c, dh = min(self.chunk_size, context_len), self.head_dim
        # chunked form as run: intra-chunk (C x C) scores and mix, inter-chunk q S, state k^T v
        per_head = 2 * c * dh + 2 * c * dh + 2 * dh * dh + 2 * dh * dh
        return proj + self.n_heads * per_head
