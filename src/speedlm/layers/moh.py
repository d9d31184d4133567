"""Mixture-of-heads attention (MoH, Jin et al. 2024, arXiv:2410.11842).

Attention heads as experts: each token uses the `shared` heads always and `top_k` of the other
(routed) heads, chosen by a router, and the output is the gate-weighted sum of the heads it
uses instead of their plain concatenation:

    [a_1, a_2] = softmax(W_h x)                       (how much shared vs routed, per token)
    g_i = a_1 softmax(W_s x)_i                        shared head i
    g_i = a_2 softmax(W_r x)_i if i in top_k else 0    routed head i
    y   = W_O concat_i (g_i head_i(x))

with the Switch balance loss on the routed heads (`moh_balance`, times `balance_coef`). Keys and
values are computed for every head and token (a later query may route anywhere); the queries'
attention runs only for the (token, head) pairs routed there (ops/routed_heads.py), so the
attention FLOPs follow the active heads: (shared + top_k) / n_heads of attention's.

Paths: training and prefill without documents take the routed form; everything else (a cache,
documents, bidirectional calls) computes every head and multiplies by the gates, zeros for the
heads a token does not use: the same function (the contract suite checks decoding against the
forward), with KV caches and their policies as attention has them.
"""

from __future__ import annotations

from typing import Annotated

import torch
from torch import nn

from speedlm.errors import SpeedlmError
from speedlm.layers.attention import AttentionBase
from speedlm.layers.dims import ModelDims
from speedlm.layers.flops import Flops, attention_flops, causal_keys
from speedlm.layers.mixer import SeqMeta, linear_flops
from speedlm.ops.attention import repeat_kv
from speedlm.ops.moe import balance_loss
from speedlm.ops.routed_heads import routed_head_attention
from speedlm.registry import Range


class MixtureOfHeadsAttention(AttentionBase):
    @classmethod
    def reversible_problem(cls, **options) -> str | None:
        return "MoH adds an auxiliary loss (head balance), which a recomputed forward cannot carry"

    @classmethod
    def check_options(cls, dims: ModelDims, shared: int | None = None, top_k: int | None = None, **options) -> None:
        super().check_options(dims, **options)
        s = max(1, dims.n_heads // 4) if shared is None else shared
        routed = dims.n_heads - s
        if routed < 1 and (shared is not None or dims.n_heads > 1):
            raise SpeedlmError(f"moh: shared={s} leaves no routed heads of n_heads={dims.n_heads}")
        if top_k is not None and top_k > routed:
            raise SpeedlmError(f"moh: top_k={top_k} is more than the {routed} routed heads")

    def __init__(
        self,
        dims: ModelDims,
        shared: Annotated[int | None, Range(min=0)] = None,
        top_k: Annotated[int | None, Range(min=1)] = None,
        kv_heads: Annotated[int | None, Range(min=1)] = None,
        balance_coef: Annotated[float, Range(min=0)] = 0.01,
        block_size: Annotated[int, Range(min=1)] = 64,
    ):
        super().__init__(dims, kv_heads)
        h = self.n_heads
        # defaults: a quarter of the heads shared, half of the rest per token (tiny: 1 + 1 of 4); a
        # single head (MQAR's probe models) has nothing to route: it is shared, plain attention
        self.shared = max(1, h // 4) if shared is None else shared
        self.routed = h - self.shared
        self.top_k = 0 if self.routed == 0 else max(1, self.routed // 2) if top_k is None else top_k
        self.balance_coef, self.block_size = balance_coef, block_size
        self.n_mix = 2 if self.routed else 0  # shared vs routed weights, where there are routed heads
        self.router = nn.Linear(dims.d_model, self.n_mix + self.shared + self.routed, bias=False)
        self._call_gates: torch.Tensor | None = None
        self.reset_parameters()

    # ----- routing -----
    def _route(self, x: torch.Tensor):
        """gates (B, H, T), routed-head probabilities (B, T, R) and choices (B, T, k), float32+."""
        logits = self.router(x).to(torch.promote_types(x.dtype, torch.float32))
        mix, shared, routed = logits.split([self.n_mix, self.shared, self.routed], dim=-1)
        if not self.routed:
            return torch.softmax(shared, dim=-1).transpose(1, 2), routed, routed.long()
        a = torch.softmax(mix, dim=-1)
        probs = torch.softmax(routed, dim=-1)
        top, chosen = probs.topk(self.top_k, dim=-1)
        routed_gates = torch.zeros_like(probs).scatter(-1, chosen, top) * a[..., 1:]
        gates = torch.cat([a[..., :1] * torch.softmax(shared, dim=-1), routed_gates], dim=-1)
        return gates.transpose(1, 2), probs, chosen

    def output(self, y_bhtd: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Every head's output weighted by its gate (zero where a token does not use it): the
        gates `mix` routed for this call (attention's `mix` calls this with the same x)."""
        gates = self._call_gates if self._call_gates is not None else self._route(x)[0]
        return super().output(y_bhtd * gates[..., None].to(y_bhtd.dtype), x)

    def reference_output(self, y_bhtd, x=None):
        logits = torch.einsum("btd,ed->bte", x, self.router.weight)
        mix, shared, routed = logits.split([self.n_mix, self.shared, self.routed], dim=-1)
        if not self.routed:
            gates = (torch.exp(shared) / torch.exp(shared).sum(-1, keepdim=True)).transpose(1, 2)
            return super().reference_output(y_bhtd * gates[..., None], x)
        a = torch.exp(mix) / torch.exp(mix).sum(-1, keepdim=True)
        probs = torch.exp(routed) / torch.exp(routed).sum(-1, keepdim=True)
        kth = probs.sort(dim=-1, descending=True).values[..., self.top_k - 1 : self.top_k]
        routed_gates = torch.where(probs >= kth, probs, torch.zeros_like(probs)) * a[..., 1:]
        shared_gates = a[..., :1] * torch.exp(shared) / torch.exp(shared).sum(-1, keepdim=True)
        gates = torch.cat([shared_gates, routed_gates], dim=-1).transpose(1, 2)
        return super().reference_output(y_bhtd * gates[..., None], x)

    # ----- forward -----
    def mix(self, x, meta: SeqMeta, cache=None):
        gates, probs, chosen = self._route(x)
        if meta.aux is not None and self.balance_coef and self.routed:
            loss = balance_loss(probs.reshape(-1, self.routed), chosen.reshape(-1, self.top_k))
            meta.aux.add("moh_balance", self.balance_coef * loss)
        if cache is not None or not meta.causal or meta.doc_ids is not None:
            self._call_gates = gates  # every head, gated in `output` (routed once per call)
            try:
                return super().mix(x, meta, cache)
            finally:
                self._call_gates = None
        q, k, v = self.project(x)
        cos, sin = self._rope_table(meta.query_positions(), x.shape[1], q)
        q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        groups = self.n_heads // self.kv_heads
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)  # per query head: heads are split below
        s = self.shared
        y = torch.nn.functional.scaled_dot_product_attention(q[:, :s], k[:, :s], v[:, :s], is_causal=True)
        if self.routed:
            sel = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, chosen, True).transpose(1, 2)  # (B, R, T)
            y = torch.cat([y, routed_head_attention(q[:, s:], k[:, s:], v[:, s:], sel, block=self.block_size)], dim=1)
        y = y * gates[..., None].to(q.dtype)
        return self.o_proj(self.merge_heads(y))

    # ----- cost -----
    def active_heads(self) -> int:
        return self.shared + self.top_k

    def flops_breakdown(self, context_len: int, causal: bool = True) -> Flops:
        keys = causal_keys(context_len) if causal else context_len
        return Flops(linear=self.projection_flops() + linear_flops(self.router),
                     matmul=attention_flops(self.active_heads(), keys, self.head_dim, self.head_dim))
