"""Native sparse attention (NSA, Yuan et al. 2025, arXiv:2502.11089) as a mixer: GQA projections
with RoPE, the three branches of ops/nsa.py (pooled blocks, the blocks they rank highest, a
sliding window) on the same keys and values, mixed per head and token by sigmoid gates from the
input, y = W_o sum_c g_c o_c.

As flash-linear-attention's NSA layer: mean-pooled compression, compression blocks equal to
selection blocks, one set of keys and values for the three branches. Simplified against the
paper: its compression is a learned MLP over overlapping blocks (l = 32, stride 16) with
intra-block positions, its selection blocks (l' = 64) differ from its compression blocks, and
each branch has its own keys and values. The cache keeps every key and value (decoding pools the
complete blocks again from it, O(T D) per token, one pass over the cache as attention makes);
lossy KV policies are refused (the selection may pick any block).
"""

from __future__ import annotations

from typing import Annotated

import torch
from torch import nn

from speedlm.cache.buffer import TokenBuffer
from speedlm.cache.kv import FullPolicy, refuse_lossy
from speedlm.errors import SpeedlmError
from speedlm.layers.attention import AttentionBase
from speedlm.layers.dims import ModelDims
from speedlm.layers.flops import Flops, attention_flops
from speedlm.layers.mixer import SeqMeta, linear_flops
from speedlm.layers.rope import rope_reference
from speedlm.ops.attention import attention_reference
from speedlm.ops.masks import window_mean_keys
from speedlm.ops.nsa import nsa_branches, nsa_masks
from speedlm.registry import Range


class NativeSparseAttention(AttentionBase):
    supports_bidirectional = False  # the selection ranks blocks in the query's past
    supports_doc_ids = False  # a selected block may lie in another document

    @classmethod
    def check_options(cls, dims: ModelDims, top_n: int = 16, **options) -> None:
        super().check_options(dims, **options)
        if top_n < 3:
            raise SpeedlmError(f"nsa: top_n={top_n} must be at least 3 (the first, the previous and the own block "
                               "are always selected)")

    def __init__(
        self,
        dims: ModelDims,
        block_size: Annotated[int, Range(min=1)] = 64,
        top_n: Annotated[int, Range(min=3)] = 16,
        window: Annotated[int, Range(min=1)] = 512,
        kv_heads: Annotated[int | None, Range(min=1)] = None,
    ):
        super().__init__(dims, kv_heads)
        self.block_size, self.top_n, self.window = block_size, top_n, window
        self.branch_gate = nn.Linear(dims.d_model, 3 * self.n_heads, bias=False)
        self.reset_parameters()

    @staticmethod
    def _refuse_lossy(kv_policy) -> None:
        refuse_lossy(kv_policy, "nsa", "keeps every key (its selection may read any block)")

    def _gates(self, x):
        """(B, H, T, 3) sigmoid gates of the compressed, selected and window branches."""
        b, t, _ = x.shape
        return torch.sigmoid(self.branch_gate(x)).view(b, t, self.n_heads, 3).transpose(1, 2)

    def mix(self, x, meta: SeqMeta, cache: TokenBuffer | None = None):
        q, k, v = self.project(x)
        cos, sin = self._rope_table(meta.query_positions(), x.shape[1], q)
        q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        if cache is not None:
            (k, v), _ = cache.extend(k, v)
        cmp, sel, swa = nsa_branches(q, k, v, self.block_size, self.top_n, self.window)
        g = self._gates(x).to(q.dtype)
        return self.output(g[..., 0:1] * cmp + g[..., 1:2] * sel + g[..., 2:3] * swa, x)

    def reference(self, x, meta: SeqMeta, policy=None):
        """The three branches as dense float64 computations: the pooled blocks' softmax written
        out, the selection and the window as (T, T) masks."""
        self._refuse_lossy(policy)
        t = x.shape[1]
        q, k, v = self.reference_project(x)
        pos = meta.position_tensor(t, x.device)
        q, k = rope_reference(q, pos, self.rope_theta), rope_reference(k, pos, self.rope_theta)
        scale, bs = self.head_dim**-0.5, self.block_size
        nb = t // bs
        idx = torch.arange(t, device=x.device)
        member = (idx[None, :] // bs == torch.arange(nb, device=x.device)[:, None]).to(x.dtype) / bs  # (NB, T)
        groups = self.n_heads // self.kv_heads
        k_cmp, v_cmp = (torch.einsum("bhtd,nt->bhnd", y, member).repeat_interleave(groups, dim=1) for y in (k, v))
        visible = (torch.arange(nb, device=x.device) + 1) * bs - 1 <= idx[:, None]  # (T, NB)
        scores = torch.einsum("bhtd,bhnd->bhtn", q, k_cmp) * scale
        probs = torch.nan_to_num(torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1), nan=0.0)
        cmp = probs @ v_cmp
        selected, window = nsa_masks(probs, t, self.kv_heads, self.block_size, self.top_n, self.window)
        sel = attention_reference(q, k, v, selected, scale)
        swa = attention_reference(q, k, v, window, scale)
        logits = torch.einsum("btd,ed->bte", x, self.branch_gate.weight).view(*x.shape[:2], self.n_heads, 3)
        g = (1 / (1 + torch.exp(-logits))).transpose(1, 2)
        return self.reference_output(g[..., 0:1] * cmp + g[..., 1:2] * sel + g[..., 2:3] * swa, x)

    def init_cache(self, kv_policy=None):
        self._refuse_lossy(kv_policy)
        return TokenBuffer(FullPolicy(), n_entries=2)

    def max_context(self, kv_policy=None):
        return self.dims.max_seq_len  # RoPE positions, a full cache

    def _mean_keys(self, context_len: int) -> float:
        """Keys a causal query reads on average: the pooled blocks before it, its selected blocks
        (up to top_n, the own one up to itself) and its window."""
        t, bs = context_len, self.block_size
        pos = torch.arange(t, dtype=torch.float64, device="cpu")  # not the default device (plans build on meta)
        pooled = torch.floor((pos + 1) / bs)
        complete = torch.floor(pos / bs)  # earlier whole blocks
        selected = complete.clamp(max=self.top_n - 1.0) * bs + (pos % bs) + 1
        return float((pooled + selected).mean()) + window_mean_keys(t, self.window)

    def flops_breakdown(self, context_len: int, causal: bool = True) -> Flops:
        return Flops(linear=self.projection_flops() + linear_flops(self.branch_gate),
                     matmul=attention_flops(self.n_heads, self._mean_keys(context_len), self.head_dim, self.head_dim))
