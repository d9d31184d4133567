"""Gated Linear Attention (GLA, Yang et al. 2023, arXiv:2312.06635).

Linear attention whose matrix state forgets per key channel, at a rate the input decides:

    alpha_t = sigmoid(W_2 W_1 x_t + b)^(1/16)          (low-rank gate, rank 16; tau = 16)
    S_t = diag(alpha_t) S_{t-1} + k_t v_t^T,  o_t = S_t^T q_t / sqrt(Dk)
    y   = W_o( swish(W_r x) * RMSNorm_heads(o) )

with half-width keys (Dk = d / 2 / H, the paper's expand_k = 0.5) and no feature map. The
temperature tau = 16 keeps alpha near 1 (slow forgetting) at initialisation. Log gates are
floored at -5 per step (alpha >= 0.0067, i.e. a channel still forgets 99% in one step), the
range where the chunked per-channel form is exact in float32 (ops/gla.py); the floor is part
of the parameterisation, so the reference sees it too.
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from speedlm.cache.recurrent import RecurrentState
from speedlm.errors import SpeedlmError
from speedlm.layers.dims import ModelDims
from speedlm.layers.flops import Flops
from speedlm.layers.mixer import SeqMeta, linear_flops
from speedlm.layers.recurrent_heads import GatedHeadsMixer
from speedlm.ops.gla import GLA, LOG_DECAY_FLOOR, gla_recurrent
from speedlm.registry import Range


class GatedLinearAttention(GatedHeadsMixer):
    @classmethod
    def check_options(cls, dims: ModelDims, expand_k: float = 0.5, **options) -> None:
        width = dims.d_model * expand_k
        if width != int(width) or int(width) % dims.n_heads:
            raise SpeedlmError(f"expand_k={expand_k} x d_model={dims.d_model} does not split into {dims.n_heads} heads")

    def __init__(
        self,
        dims: ModelDims,
        expand_k: Annotated[float, Range(min=0.0625, max=4)] = 0.5,
        gate_rank: Annotated[int, Range(min=1)] = 16,
        gate_temperature: Annotated[float, Range(min=1)] = 16.0,
        chunk_size: Annotated[int, Range(min=1)] = 64,
    ):
        key_dim = int(dims.d_model * expand_k) // dims.n_heads
        super().__init__(dims, key_dim=key_dim, value_dim=dims.head_dim, norm="rms", chunk_size=chunk_size)
        self.gate_temperature = gate_temperature
        self.gate_down = nn.Linear(dims.d_model, gate_rank, bias=False)
        self.gate_up = nn.Linear(gate_rank, self.n_heads * key_dim, bias=True)
        self.reset_parameters()

    def _log_gate(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, T, Dk) log alpha, floored (see module doc)."""
        g = F.logsigmoid(self.gate_up(self.gate_down(x))) / self.gate_temperature
        return self.split_heads(g, self.n_heads).clamp_min(-LOG_DECAY_FLOOR)

    def mix(self, x, meta: SeqMeta, cache: RecurrentState | None = None):
        q, k, v = self.project(x)
        dt = self.recurrence_dtype(x)
        g = self._log_gate(x).to(dt)
        init = None if cache is None or cache.state is None else cache.state[0]
        o, state = GLA(q.to(dt), k.to(dt), v.to(dt), g, initial_state=init, chunk_size=self.chunk_size)
        if cache is not None:
            cache.state = (state,)
        return self.gated_output(o, x)

    def reference(self, x, meta: SeqMeta):
        q, k, v = self.reference_project(x)
        low = torch.einsum("btd,rd->btr", x, self.gate_down.weight)
        logits = torch.einsum("btr,er->bte", low, self.gate_up.weight) + self.gate_up.bias
        g = (torch.log(torch.sigmoid(logits)) / self.gate_temperature).clamp_min(-LOG_DECAY_FLOOR)
        g = g.view(*g.shape[:2], self.n_heads, self.key_dim).transpose(1, 2)
        o, _ = gla_recurrent(q, k, v, g)
        return self.reference_gated_output(o, x)

    def flops_breakdown(self, context_len: int, causal: bool = True) -> Flops:
        gate = linear_flops(self.gate_down, self.gate_up)
        return Flops(linear=self.projection_flops() + gate, matmul=self.chunked_flops(context_len))
