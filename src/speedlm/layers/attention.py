"""Softmax attention mixers: full causal attention (MHA / GQA / MQA) on SDPA, and the shared
projection + RoPE + KV-cache plumbing that sparse patterns reuse."""

from __future__ import annotations

import torch
from torch import nn

from speedlm.cache.kv import FullPolicy, KVCache
from speedlm.errors import SpeedlmError
from speedlm.layers.dims import ModelDims
from speedlm.layers.mixer import Mixer, SeqMeta, linear_flops
from speedlm.layers.rope import apply_rope, rope_table
from speedlm.ops.attention import attention_reference, causal_mask, causal_sdpa


class AttentionBase(Mixer):
    """q/k/v/o projections with RoPE and grouped KV heads. Subclasses choose the pattern:
    `_attend` (fast form), `_reference_mask` (dense mask for the naive form), `_cache_policy`."""

    def __init__(self, dims: ModelDims, kv_heads: int | None = None):
        super().__init__()
        self.n_heads = dims.n_heads
        self.kv_heads = dims.n_heads if kv_heads is None else kv_heads
        if self.kv_heads < 1 or self.n_heads % self.kv_heads:
            raise SpeedlmError(f"kv_heads={self.kv_heads} must divide n_heads={self.n_heads}")
        self.head_dim = dims.head_dim
        self.rope_theta = dims.rope_theta
        d, dh = dims.d_model, self.head_dim
        self.q_proj = nn.Linear(d, self.n_heads * dh, bias=False)
        self.k_proj = nn.Linear(d, self.kv_heads * dh, bias=False)
        self.v_proj = nn.Linear(d, self.kv_heads * dh, bias=False)
        self.o_proj = nn.Linear(self.n_heads * dh, d, bias=False)

    def _qkv(self, x: torch.Tensor, meta: SeqMeta):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope_table(meta.start, t, self.head_dim, self.rope_theta, x.device)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _out(self, y_bhtd: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = y_bhtd.shape
        return self.o_proj(y_bhtd.transpose(1, 2).reshape(b, t, -1))

    def forward(self, x, meta: SeqMeta, cache: KVCache | None = None):
        q, k, v = self._qkv(x, meta)
        if cache is not None:
            k, v = cache.extend(k, v)
        # keys run up to the last query, so the first key sits at start + T - Tk
        kv_start = meta.start + x.shape[1] - k.shape[2]
        return self._out(self._attend(q, k, v, meta.start, kv_start))

    def reference(self, x, meta: SeqMeta):
        q, k, v = self._qkv(x, meta)
        t = x.shape[1]
        return self._out(attention_reference(q, k, v, self._reference_mask(t, meta.start, x.device)))

    def init_cache(self) -> KVCache:
        return KVCache(self._cache_policy())

    def state_bytes(self, context_len: int, batch_size: int = 1, bytes_per_elem: int = 2) -> int:
        kept = self._cache_policy().keep(context_len)
        return 2 * batch_size * self.kv_heads * self.head_dim * kept * bytes_per_elem

    def flops_per_token(self, context_len: int) -> float:
        proj = linear_flops(self.q_proj, self.k_proj, self.v_proj, self.o_proj)
        return proj + 4.0 * self.n_heads * self.head_dim * self._mean_keys(context_len)


class Attention(AttentionBase):
    """Full causal softmax attention; kv_heads < n_heads gives GQA, kv_heads == 1 MQA."""

    def _cache_policy(self):
        return FullPolicy()

    def _attend(self, q, k, v, q_start, kv_start):
        return causal_sdpa(q, k, v)

    def _reference_mask(self, t, start, device):
        return causal_mask(t, t, device)

    def _mean_keys(self, context_len: int) -> float:
        return (context_len + 1) / 2
