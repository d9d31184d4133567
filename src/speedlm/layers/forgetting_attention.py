"""Forgetting Transformer attention (FoX, Lin et al. 2025, arXiv:2503.02130).

Causal softmax attention with a scalar forget gate per head and token, f_t = sigmoid(w_f . x_t
+ b_f), whose log products between key and query are added to the logits:

    o_i = sum_{j <= i} softmax_j(q_i . k_j / sqrt(D) + sum_{j < l <= i} log f_l) v_j

A head may learn to keep everything (f = 1: plain attention) or to look only at recent tokens,
per token. As the paper's FoX (LLaMA) layer: no positional encoding (`positions: none`; the
forget gate orders the tokens), the gate a bias-carrying projection to one logit per head,
`output_gate` and `qk_norm` as options (two of FoX (Pro)'s additions). The bias is never a
(T, T) tensor: ops/forgetting_attention.py folds it into one more key channel and runs SDPA.

The cache holds the keys, values and each position's cumulative log gate c_t (float64: its
differences are what matter, and they must stay exact after millions of tokens), so decoding
reads c_i - c_j without recomputing anything; it keeps every key (a lossy KV policy is refused:
the paper prunes by the gate's own decay, not by a fixed window).
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from speedlm.cache.buffer import TokenBuffer
from speedlm.cache.kv import FullPolicy, refuse_lossy
from speedlm.layers.attention import AttentionBase, Positions
from speedlm.layers.dims import ModelDims
from speedlm.layers.flops import Flops, attention_flops, causal_keys
from speedlm.layers.mixer import SeqMeta, linear_flops
from speedlm.ops.forgetting_attention import forgetting_attention, forgetting_attention_reference
from speedlm.registry import Range


class ForgettingAttention(AttentionBase):
    supports_bidirectional = False  # the gate's products run from key to query: a causal rule
    supports_doc_ids = False

    def __init__(
        self,
        dims: ModelDims,
        kv_heads: Annotated[int | None, Range(min=1)] = None,
        positions: Positions = "none",
        qk_norm: bool = False,
        output_gate: bool = False,
        block_size: Annotated[int, Range(min=1)] = 256,
    ):
        super().__init__(dims, kv_heads, positions, qk_norm=qk_norm, output_gate=output_gate)
        self.block_size = block_size
        self.f_proj = nn.Linear(dims.d_model, self.n_heads, bias=True)
        self.reset_parameters()

    @staticmethod
    def _refuse_lossy(kv_policy) -> None:
        refuse_lossy(kv_policy, "forgetting_attention", "keeps every key (its gates decide what is forgotten)")

    def _log_gates(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, T) cumulative log forget gates from this call's first token, in float64."""
        return F.logsigmoid(self.f_proj(x).to(torch.float64)).transpose(1, 2).cumsum(-1)

    def mix(self, x, meta: SeqMeta, cache: TokenBuffer | None = None):
        q, k, v = self.project(x)
        t = x.shape[1]
        cos, sin = self._rope_table(meta.query_positions(), t, q)
        q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        c = self._log_gates(x)
        if cache is None:
            k_all, v_all, c_k = k, v, c
        else:
            if cache.length:
                c = c + cache.entries()[2][:, :, -1:, 0]  # continue from the last cached position
            (k_all, v_all, c_all), _ = cache.extend(k, v, c[..., None])
            c_k = c_all[..., 0]
        return self.output(forgetting_attention(q, k_all, v_all, c, c_k, block_size=self.block_size), x)

    def reference(self, x, meta: SeqMeta, policy=None):
        """Dense float64 scores plus the (T, T) bias from the gates, with projections and RoPE
        computed independently of the fast path."""
        self._refuse_lossy(policy)
        t = x.shape[1]
        q, k, v = self.reference_project(x)
        if self.positions == "rope":
            pos = meta.position_tensor(t, x.device)
            q, k = self._rotate_reference(q, pos), self._rotate_reference(k, pos)
        logits = torch.einsum("btd,hd->bht", x, self.f_proj.weight) + self.f_proj.bias[:, None]
        c = torch.cumsum(-torch.log1p(torch.exp(-logits)), dim=-1)  # sum of log sigmoid
        return self.reference_output(forgetting_attention_reference(q, k, v, c, c), x)

    def init_cache(self, kv_policy=None):
        self._refuse_lossy(kv_policy)
        return TokenBuffer(FullPolicy(), n_entries=3)

    def max_context(self, kv_policy=None):
        # without positions nothing is tied to the training length; with RoPE, as attention
        return None if self.positions == "none" else self.dims.max_seq_len

    def state_bytes(self, context_len: int, batch_size: int = 1, bytes_per_elem: int = 2) -> int:
        gates = batch_size * self.n_heads * context_len * 8  # one float64 per head and token
        return super().state_bytes(context_len, batch_size, bytes_per_elem) + gates

    def flops_breakdown(self, context_len: int, causal: bool = True) -> Flops:
        return Flops(
            linear=self.projection_flops() + linear_flops(self.f_proj),
            matmul=attention_flops(self.n_heads, causal_keys(context_len), self.head_dim, self.head_dim),
        )
