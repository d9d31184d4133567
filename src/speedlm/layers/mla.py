"""Multi-head latent attention (MLA, DeepSeek-V2, arXiv:2405.04434).

Keys and values of every head are decompressed from one low-rank latent per token, and
positions travel in a separate, narrow key shared by the heads (the decoupled RoPE key),
because RoPE between W_UK and the query would stop W_UK from being folded into the query:

    c_t   = RMSNorm(W_DKV x_t)                          (kv_rank)      cached
    kR_t  = RoPE(W_KR x_t)                              (rope_dim)     cached, shared by heads
    k_t,h = [W_UK,h c_t ; kR_t],   v_t,h = W_UV,h c_t
    q_t,h = [W_UQ,h x_t ; RoPE(W_QR,h x_t)]             (or through a q latent: `q_rank`)
    o_t   = W_O concat_h softmax_j(q_t,h . k_j,h / sqrt(nope_dim + rope_dim)) v_j,h

The cache is c and kR: kv_rank + rope_dim numbers per token and layer, whatever the heads
(DeepSeek-V2: 4 d_h + d_h / 2, "GQA with 2.25 groups"). Two exact forms:
- expanded (training, prefill into an empty cache, bidirectional): k and v materialised per
  head and one SDPA call through the shared attention entry point (documents, both directions);
- absorbed (a call that reads cached latents: decoding, chunked prefill): W_UK,h folded into
  the query, q~_h = W_UK,h^T q_nope,h, so the scores are q~_h . c_j + q_rope,h . kR_j, one
  key head of width kv_rank + rope_dim shared by all query heads (MQA over the latents); the
  weighted sum of latents goes through W_UV,h and W_O afterwards. SDPA runs it with the cached
  [c ; kR] as both keys and values (the kR part of the output is dropped), so nothing per head
  is ever expanded from the cache.
Parameter layout as DeepSeek's and transformers' DeepseekV3Attention (`kv_a_proj` = their
`kv_a_proj_with_mqa`: latent then rope key; `kv_b_proj` rows per head: W_UK,h then W_UV,h),
so that a test loads the same weights into both.
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from speedlm.cache.buffer import TokenBuffer
from speedlm.cache.kv import FullPolicy, refuse_lossy
from speedlm.errors import SpeedlmError
from speedlm.layers.dims import ModelDims
from speedlm.layers.flops import Flops, attention_flops, causal_keys
from speedlm.layers.mixer import Mixer, SeqMeta, linear_flops
from speedlm.layers.norm import RMSNorm
from speedlm.layers.rope import apply_rope, rope_for, rope_reference
from speedlm.ops.attention import attention, attention_reference, causal_sdpa
from speedlm.ops.masks import AttentionMask, Full
from speedlm.registry import Range


class MultiHeadLatentAttention(Mixer):
    supports_bidirectional = True
    supports_doc_ids = True

    @classmethod
    def check_options(cls, dims: ModelDims, kv_rank: int | None = None, q_rank: int | None = None,
                      rope_dim: int | None = None, **options) -> None:
        if kv_rank is not None and kv_rank > dims.d_model:
            raise SpeedlmError(f"mla: kv_rank={kv_rank} is larger than d_model={dims.d_model}: the latent would "
                               "not compress anything")
        if q_rank is not None and q_rank > dims.d_model:
            raise SpeedlmError(f"mla: q_rank={q_rank} is larger than d_model={dims.d_model}")
        if rope_dim is not None and rope_dim % 2:
            raise SpeedlmError(f"mla: rope_dim={rope_dim} must be even (RoPE rotates pairs)")

    def __init__(
        self,
        dims: ModelDims,
        kv_rank: Annotated[int | None, Range(min=1)] = None,
        q_rank: Annotated[int | None, Range(min=1)] = None,
        rope_dim: Annotated[int | None, Range(min=2)] = None,
        nope_dim: Annotated[int | None, Range(min=1)] = None,
        v_dim: Annotated[int | None, Range(min=1)] = None,
    ):
        super().__init__(dims)
        d, h, dh = dims.d_model, dims.n_heads, dims.head_dim
        # DeepSeek-V2's proportions: latent 4 d_h (capped at the width), rope key d_h / 2
        self.kv_rank = min(4 * dh, d) if kv_rank is None else kv_rank
        self.rope_dim = max(2, dh // 2 // 2 * 2) if rope_dim is None else rope_dim
        self.nope_dim = dh if nope_dim is None else nope_dim
        self.v_dim = dh if v_dim is None else v_dim
        self.n_heads, self.q_rank = h, q_rank
        self.qk_dim = self.nope_dim + self.rope_dim
        self.rope_theta = dims.rope_theta
        if q_rank is None:
            self.q_proj = nn.Linear(d, h * self.qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, q_rank, bias=False)
            self.q_a_norm = RMSNorm(q_rank, dims.norm_eps)
            self.q_b_proj = nn.Linear(q_rank, h * self.qk_dim, bias=False)
        self.kv_a_proj = nn.Linear(d, self.kv_rank + self.rope_dim, bias=False)
        self.kv_a_norm = RMSNorm(self.kv_rank, dims.norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_rank, h * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(h * self.v_dim, d, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self.kv_a_norm.reset_parameters()
        if self.q_rank is not None:
            self.q_a_norm.reset_parameters()

    # ----- projections -----
    def _queries(self, x):
        """(B, H, T, nope_dim), (B, H, T, rope_dim), before RoPE."""
        q = self.q_proj(x) if self.q_rank is None else self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))
        b, t, _ = x.shape
        q = q.view(b, t, self.n_heads, self.qk_dim).transpose(1, 2)
        return q.split([self.nope_dim, self.rope_dim], dim=-1)

    def _latents(self, x):
        """(B, 1, T, kv_rank) normalised latents and (B, 1, T, rope_dim) rope keys, before RoPE."""
        c, k_rope = self.kv_a_proj(x).split([self.kv_rank, self.rope_dim], dim=-1)
        return self.kv_a_norm(c)[:, None], k_rope[:, None]

    def _up_weights(self):
        """W_UK (H, nope_dim, kv_rank) and W_UV (H, v_dim, kv_rank) from kv_b_proj."""
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_rank)
        return w[:, : self.nope_dim], w[:, self.nope_dim :]

    # ----- the two forms -----
    def _expanded(self, q_nope, q_rope, c, k_rope, mask: AttentionMask):
        """Keys and values per head from the latents, one attention call (values zero-padded to
        the key width: the fused kernels take one head width)."""
        b, _, tk, _ = c.shape
        kv = self.kv_b_proj(c[:, 0]).view(b, tk, self.n_heads, self.nope_dim + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(-1, self.n_heads, -1, -1)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        if self.v_dim < self.qk_dim:
            v = F.pad(v, (0, self.qk_dim - self.v_dim))
        y = attention(q, k, v, mask, scale=self.qk_dim**-0.5)
        return y[..., : self.v_dim]

    def _absorbed(self, q_nope, q_rope, c, k_rope):
        """Attention over the cached latents with W_UK folded into the queries and W_UV applied
        after the weighted sum; the queries are the last Tq of the Tk latents."""
        w_uk, w_uv = self._up_weights()
        q = torch.cat([torch.einsum("bhtn,hnc->bhtc", q_nope, w_uk), q_rope], dim=-1)
        latent_keys = torch.cat([c, k_rope], dim=-1)  # (B, 1, Tk, kv_rank + rope_dim)
        y = causal_sdpa(q, latent_keys, latent_keys, scale=self.qk_dim**-0.5)[..., : self.kv_rank]
        return torch.einsum("bhtc,hvc->bhtv", y, w_uv)

    def mix(self, x, meta: SeqMeta, cache: TokenBuffer | None = None):
        b, t, _ = x.shape
        q_nope, q_rope = self._queries(x)
        c, k_rope = self._latents(x)
        pos = meta.query_positions()
        cos, sin = rope_for(pos, t, self.rope_dim, self.rope_theta, x.device, q_rope.dtype)
        q_rope, k_rope = apply_rope(q_rope, cos, sin), apply_rope(k_rope, cos, sin)
        if cache is not None and cache.length:
            (c, k_rope), _ = cache.extend(c, k_rope, positions=pos)
            y = self._absorbed(q_nope, q_rope, c, k_rope)
        else:
            if cache is not None:
                cache.extend(c, k_rope, positions=pos)
            mask = AttentionMask(Full(), t, t, pos, pos, meta.causal, meta.doc_ids, meta.doc_ids)
            y = self._expanded(q_nope, q_rope, c, k_rope, mask)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.n_heads * self.v_dim))

    def reference(self, x, meta: SeqMeta):
        """The expanded form written from the weights with einsums and a dense mask."""
        b, t, _ = x.shape
        if self.q_rank is None:
            q = torch.einsum("btd,ed->bte", x, self.q_proj.weight)
        else:
            a = torch.einsum("btd,rd->btr", x, self.q_a_proj.weight)
            a = a / torch.sqrt(a.pow(2).mean(-1, keepdim=True) + self.q_a_norm.eps) * self.q_a_norm.weight
            q = torch.einsum("btr,er->bte", a, self.q_b_proj.weight)
        q = q.view(b, t, self.n_heads, self.qk_dim).transpose(1, 2)
        ckr = torch.einsum("btd,ed->bte", x, self.kv_a_proj.weight)
        c, k_rope = ckr[..., : self.kv_rank], ckr[..., self.kv_rank :]
        c = c / torch.sqrt(c.pow(2).mean(-1, keepdim=True) + self.kv_a_norm.eps) * self.kv_a_norm.weight
        w_uk, w_uv = self._up_weights()
        k_nope = torch.einsum("btc,hnc->bhtn", c, w_uk)
        v = torch.einsum("btc,hvc->bhtv", c, w_uv)
        pos = meta.position_tensor(t, x.device)
        q_rope = rope_reference(q[..., self.nope_dim :], pos, self.rope_theta)
        k_rope = rope_reference(k_rope[:, None], pos, self.rope_theta).expand(-1, self.n_heads, -1, -1)
        q = torch.cat([q[..., : self.nope_dim], q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope], dim=-1)
        idx = torch.arange(t, device=x.device)
        allowed = torch.ones(t, t, dtype=torch.bool, device=x.device)
        if meta.causal:
            allowed = idx[None, :] <= idx[:, None]
        allowed = allowed.expand(b, t, t)
        if meta.doc_ids is not None:
            allowed = allowed & (meta.doc_ids[:, :, None] == meta.doc_ids[:, None, :])
        y = attention_reference(q, k, v, allowed, scale=self.qk_dim**-0.5)
        w_o = self.o_proj.weight.view(-1, self.n_heads, self.v_dim)
        return torch.einsum("bhtv,dhv->btd", y, w_o)

    # ----- the contract -----
    def init_cache(self, kv_policy=None):
        refuse_lossy(kv_policy, "mla", "caches latents, not keys and values")
        return TokenBuffer(FullPolicy(), n_entries=2)

    def max_context(self, kv_policy=None):
        return self.dims.max_seq_len  # RoPE positions, a full cache

    def state_bytes(self, context_len: int, batch_size: int = 1, bytes_per_elem: int = 2) -> int:
        return batch_size * context_len * (self.kv_rank + self.rope_dim) * bytes_per_elem

    def _projections(self) -> list[nn.Linear]:
        q = [self.q_proj] if self.q_rank is None else [self.q_a_proj, self.q_b_proj]
        return q + [self.kv_a_proj, self.kv_b_proj, self.o_proj]

    def flops_breakdown(self, context_len: int, causal: bool = True) -> Flops:
        # the expanded form (training and prefill): every projection once per token, then
        # attention at the query/key width nope + rope and the value width
        keys = causal_keys(context_len) if causal else context_len
        return Flops(linear=linear_flops(*self._projections()),
                     matmul=attention_flops(self.n_heads, keys, self.qk_dim, self.v_dim))
