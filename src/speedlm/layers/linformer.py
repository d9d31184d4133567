"""Linformer (Wang et al. 2020, arXiv:2006.04768): keys and values are projected along the
sequence to `k` rows by learned matrices E and F (k x max_seq_len, the first T columns for a
sequence of T), so attention costs O(T k) instead of O(T^2). Bidirectional only: a projection
along the whole sequence mixes future positions into every key.

`sharing` (the paper's options): "none" (E and F per head), "headwise" (one E and one F for
all heads) or "kv" (one matrix for both keys and values, shared by the heads). RoPE rotates
queries and keys before the projection (the paper uses absolute position embeddings; the
encoder has none of its own).
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import nn

from speedlm.errors import SpeedlmError
from speedlm.layers.dims import ModelDims
from speedlm.layers.flops import Flops, attention_flops
from speedlm.layers.heads import HeadsMixer
from speedlm.layers.mixer import SeqMeta
from speedlm.layers.rope import apply_rope, rope_for, rope_reference
from speedlm.registry import Range


class Linformer(HeadsMixer):
    supports_causal = False
    supports_bidirectional = True
    supports_decoding = False

    @classmethod
    def check_options(cls, dims: ModelDims, k: int = 64, kv_heads=None, **options) -> None:
        super().check_options(dims, kv_heads=kv_heads)
        if k > dims.max_seq_len:
            raise SpeedlmError(f"Linformer's k={k} is larger than max_seq_len={dims.max_seq_len}, the longest sequence it projects")

    def __init__(
        self,
        dims: ModelDims,
        k: Annotated[int, Range(min=1)] = 64,
        sharing: Literal["none", "headwise", "kv"] = "headwise",
        kv_heads: Annotated[int | None, Range(min=1)] = None,
    ):
        super().__init__(dims, kv_heads)
        self.k, self.sharing = k, sharing
        n = dims.max_seq_len
        heads = self.kv_heads if sharing == "none" else 1
        self.e_proj = nn.Parameter(torch.empty(heads, k, n))
        self.f_proj = nn.Parameter(torch.empty(heads, k, n)) if sharing != "kv" else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        # N(0, 1/k), the paper's code: a projected key is a sum of T keys scaled to O(1)
        for p in (self.e_proj, self.f_proj):
            if p is not None:
                nn.init.normal_(p, 0.0, 1.0 / math.sqrt(self.k))

    def _projections(self, t: int):
        if t > self.e_proj.shape[-1]:
            raise SpeedlmError(f"Linformer: a sequence of {t} tokens is longer than its projections allow "
                               f"(max_seq_len={self.e_proj.shape[-1]})")
        if self.k > t:
            raise SpeedlmError(f"Linformer's k={self.k} is larger than the sequence ({t} tokens); use k <= {t}")
        e = self.e_proj[..., :t]
        return e, (e if self.f_proj is None else self.f_proj[..., :t])

    def mix(self, x, meta: SeqMeta, cache=None):
        t = x.shape[1]
        e, f = self._projections(t)
        q, k, v = self.project(x)
        cos, sin = rope_for(meta.query_positions(), t, self.head_dim, self.rope_theta, x.device, x.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = torch.matmul(e.to(k.dtype), k), torch.matmul(f.to(v.dtype), v)  # (B, Hkv, k, Dh): T rows -> k rows
        return self.output(F.scaled_dot_product_attention(q, k, v, enable_gqa=self.kv_heads != self.n_heads))

    def reference(self, x, meta: SeqMeta, policy=None):
        t = x.shape[1]
        e, f = self._projections(t)
        q, k, v = self.reference_project(x)
        pos = meta.position_tensor(t, x.device)
        q, k = rope_reference(q, pos, self.rope_theta), rope_reference(k, pos, self.rope_theta)
        per_kv = self.n_heads // self.kv_heads
        k = torch.einsum("hkt,bhtd->bhkd", e.expand(self.kv_heads, -1, -1), k).repeat_interleave(per_kv, 1)
        v = torch.einsum("hkt,bhtd->bhkd", f.expand(self.kv_heads, -1, -1), v).repeat_interleave(per_kv, 1)
        w = torch.softmax(torch.einsum("bhqd,bhkd->bhqk", q, k) / self.head_dim**0.5, dim=-1)
        return self.reference_output(torch.einsum("bhqk,bhkd->bhqd", w, v))

    @property
    def rope_theta(self) -> float:
        return self.dims.rope_theta

    def flops_breakdown(self, context_len: int, causal: bool = True) -> Flops:
        # the projections along the sequence (2 k per key and value channel) and attention to k rows
        seq = 2.0 * 2 * self.k * self.kv_heads * self.head_dim
        attend = attention_flops(self.n_heads, min(self.k, context_len), self.head_dim, self.head_dim)
        return Flops(linear=self.projection_flops(), matmul=seq + attend)

    def init_cache(self, kv_policy=None):
        raise SpeedlmError("Linformer is bidirectional-only: it has no cache and cannot decode")

    def state_bytes(self, context_len: int, batch_size: int = 1, bytes_per_elem: int = 2) -> int:
        return 0  # no cache: bidirectional only
