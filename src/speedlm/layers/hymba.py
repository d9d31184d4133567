"""Hymba's hybrid-head mixer (Dong et al. 2024, arXiv:2411.13676): attention heads and SSM heads
read the same input in parallel inside one layer; each branch's output is normalised and scaled
by a learned vector, the two are averaged and projected out:

    y = W_out( (beta_1 * RMSNorm(attn(x)) + beta_2 * RMSNorm(ssm(x))) / 2 )

Attention is sliding-window in most layers and full in the first, middle and last layer (the
paper's choice: a few global layers keep recall, the rest keep the KV cache O(window)); which one
a layer gets follows from its depth (ModelDims.layer_idx / n_layers), or `full_attention`
forces it. The SSM branch is a Mamba mixer (expand 1 by default, so that the two branches cost
about the same). The cache is one CompositeCache of the KV cache and the Mamba conv + SSM state.

The branches are the registered mixers reused whole, so each keeps its own output projection
and W_out is one extra d x d map over the paper's single fused projection (it is the projection
into the residual stream, which the model scales). Not included: Hymba's meta tokens (a learned
prefix) and cross-layer KV sharing, which are model-level, not mixer-level, mechanisms.
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from speedlm.cache.composite import CompositeCache
from speedlm.layers.attention import Attention
from speedlm.layers.dims import ModelDims
from speedlm.layers.flops import Flops
from speedlm.layers.mamba import Mamba
from speedlm.layers.mixer import SeqMeta, linear_flops
from speedlm.layers.parallel_branches import ParallelBranches
from speedlm.layers.sparse_attention import SlidingWindowAttention
from speedlm.registry import Range


def is_global_layer(layer_idx: int, n_layers: int) -> bool:
    """Hymba's full-attention layers: the first, the middle and the last."""
    return layer_idx in {0, n_layers // 2, n_layers - 1}


class Hymba(ParallelBranches):
    residual_out = ("o_proj",)

    def __init__(
        self,
        dims: ModelDims,
        window: Annotated[int, Range(min=1)] = 1024,
        kv_heads: Annotated[int | None, Range(min=1)] = None,
        full_attention: bool | None = None,
        d_state: Annotated[int, Range(min=1)] = 16,
        ssm_expand: Annotated[int, Range(min=1)] = 1,
        chunk_size: Annotated[int, Range(min=1)] = 32,
    ):
        super().__init__(dims)
        d = dims.d_model
        self.full = is_global_layer(dims.layer_idx, dims.n_layers) if full_attention is None else full_attention
        self.attn = Attention(dims, kv_heads) if self.full else SlidingWindowAttention(dims, window, kv_heads)
        self.ssm = Mamba(dims, d_state=d_state, expand=ssm_expand, chunk_size=chunk_size)
        self.beta_attn = nn.Parameter(torch.empty(d))
        self.beta_ssm = nn.Parameter(torch.empty(d))
        self.o_proj = nn.Linear(d, d, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.attn.reset_parameters()
        self.ssm.reset_parameters()  # A_log, D, dt bias as Mamba's
        nn.init.normal_(self.o_proj.weight, 0.0, self.dims.init_std)
        nn.init.ones_(self.beta_attn)
        nn.init.ones_(self.beta_ssm)

    def _combine(self, a, s, rms):
        return self.o_proj((self.beta_attn * rms(a) + self.beta_ssm * rms(s)) / 2)

    def mix(self, x, meta: SeqMeta, cache: CompositeCache | None = None):
        a, s = self.branches(x, meta, cache)
        eps = self.dims.norm_eps
        return self._combine(a, s, lambda v: F.rms_norm(v, (v.shape[-1],), eps=eps))

    def reference(self, x, meta: SeqMeta, policy=None):
        a, s = self.reference_branches(x, meta, policy)
        eps = self.dims.norm_eps
        return self._combine(a, s, lambda v: v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + eps))

    def flops_breakdown(self, context_len: int, causal: bool = True) -> Flops:
        # the branch norms are not counted
        return self.branch_flops(context_len) + Flops(linear=linear_flops(self.o_proj))
