"""Mixture-of-Experts FFN (`moe`): a float32 router picks `top_k` of `experts` SwiGLU experts per
token (token choice; Shazeer et al. 2017, arXiv:1701.06538; Mixtral's renormalised top-k,
arXiv:2401.04088), optionally beside always-on `shared` experts, with fine-grained experts by
choosing many small ones (DeepSeekMoE, Dai et al. 2024, arXiv:2401.06066).

- Shared experts: one SwiGLU as wide as `shared` experts (or `shared_hidden` wide, Qwen2-MoE's
  `shared_expert_intermediate_size`), every token goes through it; `shared_gate` scales its
  output by sigmoid(w . x), a learned per-token scalar (Qwen2-MoE's `shared_expert_gate`).
- Weights: top-k > 1 renormalises the softmax over the chosen experts (Mixtral), or with
  `renormalize=False` keeps the chosen experts' softmax probabilities as they are (DeepSeekMoE,
  Jamba); top-1 always keeps the raw probability (Switch), so the router still gets the
  language-model gradient.
- Auxiliary losses, through the forward context (`meta.aux`), already weighted: `moe_balance`
  (Switch load balancing, 1 for a balanced router, times `balance_coef`) and `moe_z` (router
  z-loss times `z_coef`), summed over layers.
- `capacity_factor`: during training each expert takes at most ceil(factor * N * k / E) of the
  batch's assignments, the rest are dropped (those tokens ride the residual). Inference is
  dropless, so the cached and the uncached forward always agree (a capacity would make a
  token's output depend on how many tokens share its call). None: dropless everywhere.
- `routing="expert"`: expert choice (Zhou et al. 2022, arXiv:2202.09368), each expert takes the
  ceil(capacity_factor * T * k / E) tokens of each row that score it highest. It sees the future,
  so a causal (`ar`) model refuses it (config validation) and bidirectional models use it.
- Dispatch is ops/moe.py's sorted grouped matrix product: no Python loop over tokens.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import nn

from speedlm.errors import SpeedlmError
from speedlm.layers.dims import ModelDims
from speedlm.layers.ffn import FFN
from speedlm.layers.flops import Flops
from speedlm.layers.mlp import SwiGLU
from speedlm.layers.mixer import SeqMeta
from speedlm.ops.moe import balance_loss, expert_capacity, expert_choice_swiglu, moe_swiglu, route_topk, z_loss
from speedlm.registry import Range


class MoE(FFN):
    @classmethod
    def check_options(cls, dims: ModelDims, experts: int = 8, top_k: int = 2, shared: int = 0,
                      shared_hidden: int | None = None, shared_gate: bool = False, **options) -> None:
        if top_k > experts:
            raise SpeedlmError(f"top_k={top_k} must not exceed the number of experts ({experts})")
        for name, value in (("shared_hidden", shared_hidden is not None), ("shared_gate", shared_gate)):
            if value and not shared:
                raise SpeedlmError(f"{name} shapes the shared expert, which needs shared >= 1 (got shared={shared})")

    @classmethod
    def causal_problem(cls, routing: str = "token", **options) -> str | None:
        """Why these options cannot serve a causal model (None: they can)."""
        if routing == "expert":
            return ("expert-choice routing picks each expert's tokens from the whole call, future tokens included; "
                    "use it in bidirectional models, or routing='token' in a causal one")
        return None

    position_wise = False  # routing, capacity and the auxiliary losses see the whole call

    @classmethod
    def reversible_problem(cls, **options) -> str | None:
        return "MoE adds auxiliary losses (balance, z-loss), which a recomputed forward cannot carry"

    def __init__(
        self,
        dims: ModelDims,
        experts: Annotated[int, Range(min=1)] = 8,
        top_k: Annotated[int, Range(min=1)] = 2,
        hidden: Annotated[int | None, Range(min=1)] = None,
        shared: Annotated[int, Range(min=0)] = 0,
        capacity_factor: Annotated[float | None, Range(min=0.01)] = None,
        balance_coef: Annotated[float, Range(min=0)] = 0.01,
        z_coef: Annotated[float, Range(min=0)] = 0.001,
        routing: Literal["token", "expert"] = "token",
        renormalize: bool = True,
        shared_hidden: Annotated[int | None, Range(min=1)] = None,
        shared_gate: bool = False,
    ):
        super().__init__(dims)
        d = dims.d_model
        self.n_experts, self.top_k = experts, top_k
        self.hidden = dims.hidden_dim if hidden is None else hidden
        self.capacity_factor, self.balance_coef, self.z_coef = capacity_factor, balance_coef, z_coef
        self.routing, self.renormalize = routing, renormalize
        self.router = nn.Linear(d, experts, bias=False)
        self.w_gate = nn.Parameter(torch.empty(experts, d, self.hidden))
        self.w_up = nn.Parameter(torch.empty(experts, d, self.hidden))
        self.w_down = nn.Parameter(torch.empty(experts, self.hidden, d))
        # shared experts: one SwiGLU as wide as `shared` experts (or `shared_hidden`), every token goes through it
        width = shared * self.hidden if shared_hidden is None else shared_hidden
        self.shared = SwiGLU(dims, hidden=width) if shared else None
        self.shared_gate = nn.Linear(d, 1, bias=False) if shared and shared_gate else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.dims.init_std
        nn.init.normal_(self.router.weight, 0.0, std)
        for w in (self.w_gate, self.w_up, self.w_down):
            nn.init.normal_(w, 0.0, std)
        if self.shared_gate is not None:
            nn.init.normal_(self.shared_gate.weight, 0.0, std)

    def residual_weights(self) -> list[torch.Tensor]:
        return [self.w_down] + ([self.shared.down.weight] if self.shared is not None else [])

    def route(self, x: torch.Tensor):
        """x (N, D) -> logits (N, E) in at least float32, routing weights (N, k), experts (N, k),
        probs (N, E)."""
        dt = torch.promote_types(x.dtype, torch.float32)  # bf16/fp16 activations route in float32
        with torch.autocast(x.device.type, enabled=False):  # autocast would run the linear in bf16
            logits = F.linear(x.to(dt), self.router.weight.to(dt))
        # top-1 (Switch) keeps the raw probability: renormalised it would be 1, and the router untrained
        weights, experts, probs = route_topk(logits, self.top_k, self.renormalize and self.top_k > 1)
        return logits, weights, experts, probs

    def forward(self, x: torch.Tensor, meta: SeqMeta | None = None) -> torch.Tensor:
        shape = x.shape
        if x.shape[:-1].numel() == 0:  # no tokens: nothing to route, no losses to add
            y = torch.zeros_like(x)
            return y if self.shared is None else y + self.shared_output(x)
        flat = x.reshape(-1, shape[-1])
        logits, weights, experts, probs = self.route(flat)
        aux = meta.aux if meta is not None else None
        if self.routing == "expert":
            if meta is not None and meta.causal:
                raise SpeedlmError(self.causal_problem("expert"))
            # each expert takes ceil(factor * T * k / E) tokens of every row (k experts per token
            # on average): rows never compete, so a sequence routes the same in any batch
            capacity = expert_capacity(shape[-2], self.top_k, self.n_experts, self.capacity_factor or 1.0)
            y, _ = expert_choice_swiglu(flat, probs, capacity, self.w_gate, self.w_up, self.w_down,
                                        rows=flat.shape[0] // shape[-2])
        else:
            capacity = expert_capacity(flat.shape[0], self.top_k, self.n_experts, self.capacity_factor) if self.training else None
            y, _ = moe_swiglu(flat, weights, experts, self.w_gate, self.w_up, self.w_down, capacity)
            if aux is not None:  # expert choice is balanced by construction
                aux.add("moe_balance", self.balance_coef * balance_loss(probs, experts))
        if aux is not None:
            aux.add("moe_z", self.z_coef * z_loss(logits))
        y = y.view(shape)
        if self.shared is not None:
            y = y + self.shared_output(x)
        return y

    def shared_output(self, x: torch.Tensor) -> torch.Tensor:
        """The shared experts' output (x (..., D) -> (..., D)), gated per token when `shared_gate`."""
        y = self.shared(x)
        return y if self.shared_gate is None else torch.sigmoid(self.shared_gate(x)) * y

    def flops_breakdown(self) -> Flops:
        """Active FLOPs: the router (a functional F.linear, in float32) and the k experts (matrix
        products on the sorted tokens), and the shared experts (a SwiGLU of Linear layers, and the
        shared gate's d -> 1 Linear)."""
        d = self.dims.d_model
        shared = self.shared.flops_breakdown() if self.shared is not None else Flops()
        if self.shared_gate is not None:
            shared = shared + Flops(linear=2.0 * d)
        return Flops(matmul=2.0 * d * self.n_experts + self.top_k * 6.0 * d * self.hidden) + shared

    def num_active_params(self) -> int:
        """Parameters a token passes through (router, k experts, shared experts and their gate)."""
        expert = 3 * self.dims.d_model * self.hidden
        shared = sum(p.numel() for p in self.shared.parameters()) if self.shared is not None else 0
        if self.shared_gate is not None:
            shared += self.shared_gate.weight.numel()
        return self.router.weight.numel() + self.top_k * expert + shared
