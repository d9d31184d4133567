"""Falcon-H1's parallel hybrid mixer (Zuo et al. 2025, arXiv:2507.22448): attention heads and
Mamba-2 heads read the same normed input inside one layer, and their outputs are summed:

    y = attn(x) + mamba2(x)

Each branch keeps its own output projection into the residual stream; there is no extra
projection over the two and no per-branch norm (Hymba, layers/hymba.py, normalises, scales and
averages its branches, then projects once more). Falcon-H1's muP multipliers (on the branch
inputs, on the keys, on each segment of the Mamba in_proj, on the branch outputs) are scalings of
the adjacent projections' weights, so a trained or imported model holds them in the weights
(hf/falcon_h1.py folds them) and the mixer computes the plain sum.

The branches are the registered `attention` and `mamba2` mixers used whole, so the contract
(cache equivalence, reference, gradients) holds for the sum because it holds for each. The cache
is one CompositeCache of the KV cache and Mamba-2's conv inputs and SSM state: O(T) through the
attention, O(1) through the SSM.
"""

from __future__ import annotations

from typing import Annotated

from speedlm.cache.composite import CompositeCache
from speedlm.layers.attention import Attention
from speedlm.layers.dims import ModelDims
from speedlm.layers.flops import Flops
from speedlm.layers.mamba2 import GatedNorm, Mamba2
from speedlm.layers.mixer import SeqMeta
from speedlm.layers.parallel_branches import ParallelBranches
from speedlm.registry import Range


class ParallelHybrid(ParallelBranches):
    @classmethod
    def check_options(cls, dims: ModelDims, kv_heads: int | None = None, head_dim: int | None = None,
                      ssm_expand: int = 2, ssm_head_dim: int = 64, n_groups: int = 1, d_inner: int | None = None,
                      **options) -> None:
        Attention.check_options(dims, kv_heads=kv_heads, head_dim=head_dim)
        Mamba2.check_options(dims, expand=ssm_expand, head_dim=ssm_head_dim, n_groups=n_groups, d_inner=d_inner)

    def __init__(
        self,
        dims: ModelDims,
        kv_heads: Annotated[int | None, Range(min=1)] = None,
        head_dim: Annotated[int | None, Range(min=1)] = None,  # attention's; default d_model / n_heads
        d_state: Annotated[int, Range(min=1)] = 64,
        ssm_expand: Annotated[int, Range(min=1)] = 2,
        d_inner: Annotated[int | None, Range(min=1)] = None,  # the SSM's width; default ssm_expand * d_model
        ssm_head_dim: Annotated[int, Range(min=1)] = 64,
        n_groups: Annotated[int, Range(min=1)] = 1,
        conv_kernel: Annotated[int, Range(min=1)] = 4,
        chunk_size: Annotated[int, Range(min=1)] = 64,
        norm: GatedNorm = "after_gate",
        conv_bias: bool = True,
    ):
        super().__init__(dims)
        self.attn = Attention(dims, kv_heads, head_dim=head_dim)
        self.ssm = Mamba2(dims, d_state=d_state, expand=ssm_expand, head_dim=ssm_head_dim, n_groups=n_groups,
                          conv_kernel=conv_kernel, chunk_size=chunk_size, d_inner=d_inner, norm=norm,
                          conv_bias=conv_bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.attn.reset_parameters()
        self.ssm.reset_parameters()  # A_log, D, dt bias, the gated norm as Mamba-2's

    def residual_weights(self):
        return self.attn.residual_weights() + self.ssm.residual_weights()

    def mix(self, x, meta: SeqMeta, cache: CompositeCache | None = None):
        a, s = self.branches(x, meta, cache)
        return a + s

    def reference(self, x, meta: SeqMeta, policy=None):
        a, s = self.reference_branches(x, meta, policy)
        return a + s

    def flops_breakdown(self, context_len: int, causal: bool = True) -> Flops:
        return self.branch_flops(context_len)  # the sum of the branches is elementwise, not counted
