"""HGRN: hierarchically gated linear recurrence (Qin et al. 2023, arXiv:2311.04823).

An element-wise recurrence with a data-dependent forget gate whose lower bound rises with depth,
so that lower layers may forget quickly (local patterns) and upper layers must remember long:

    f_t = lb + (1 - lb) sigmoid(W_f x_t)                  lb = layer_idx / n_layers
    h_t = f_t * h_{t-1} + (1 - f_t) * silu(W_i x_t)       (ops/hgrn.py)
    y_t = W_o( RMSNorm(h_t) * silu(W_g x_t) )

The paper learns the bounds as cumsum(softmax(Gamma)) over the layers, a parameter shared by
the whole model; a mixer here owns only its own parameters, so each layer takes the value that
parameterisation starts from (Gamma = 0 gives exactly layer_idx / n_layers) and keeps it fixed.
Real-valued, as fla's implementation (the paper's complex phase is omitted).
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from speedlm.cache.recurrent import RecurrentState
from speedlm.layers.dims import ModelDims
from speedlm.layers.flops import Flops
from speedlm.layers.mixer import Mixer, SeqMeta, linear_flops
from speedlm.ops.hgrn import HGRN as HGRN_OP, hgrn_recurrent
from speedlm.registry import Range


class HGRN(Mixer):
    residual_out = ("o_proj",)

    def __init__(
        self,
        dims: ModelDims,
        expand: Annotated[int, Range(min=1)] = 1,
        lower_bound: Annotated[float | None, Range(min=0.0, max=0.99)] = None,
        chunk_size: Annotated[int, Range(min=1)] = 64,
    ):
        super().__init__(dims)
        d, inner = dims.d_model, expand * dims.d_model
        self.inner, self.chunk_size = inner, chunk_size
        self.lower_bound = dims.layer_idx / dims.n_layers if lower_bound is None else lower_bound
        self.i_proj, self.f_proj, self.g_proj = (nn.Linear(d, inner, bias=False) for _ in range(3))
        self.o_proj = nn.Linear(inner, d, bias=False)
        self.norm_weight = nn.Parameter(torch.ones(inner))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.ones_(self.norm_weight)

    def _gates(self, i, f):
        """(input into the state, log forget gate) from the pre-activations."""
        lb = self.lower_bound
        if lb == 0.0:
            log_f, keep_out = F.logsigmoid(f), torch.sigmoid(-f)
        else:
            log_f, keep_out = torch.log(lb + (1 - lb) * torch.sigmoid(f)), (1 - lb) * torch.sigmoid(-f)
        return F.silu(i) * keep_out, log_f

    def mix(self, x, meta: SeqMeta, cache: RecurrentState | None = None):
        dt = RecurrentState.dtype_for(x.dtype)
        inp, log_f = self._gates(self.i_proj(x).to(dt), self.f_proj(x).to(dt))
        init = None if cache is None or cache.state is None else cache.state[0]
        h, final = HGRN_OP(inp, log_f, init, chunk_size=self.chunk_size)
        if cache is not None:
            cache.state = (final,)
        h = F.rms_norm(h.to(x.dtype), (self.inner,), self.norm_weight, self.dims.norm_eps)
        return self.o_proj(h * F.silu(self.g_proj(x)))

    def reference(self, x, meta: SeqMeta):
        i, f, g = (torch.einsum("btd,ed->bte", x, p.weight) for p in (self.i_proj, self.f_proj, self.g_proj))
        lb = self.lower_bound
        forget = lb + (1 - lb) / (1 + torch.exp(-f))
        h, _ = hgrn_recurrent(i * torch.sigmoid(i) * (1 - forget), torch.log(forget))
        h = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + self.dims.norm_eps) * self.norm_weight
        return torch.einsum("bte,de->btd", h * g * torch.sigmoid(g), self.o_proj.weight)

    def init_cache(self, kv_policy=None):
        return RecurrentState()

    def state_bytes(self, context_len: int, batch_size: int = 1, bytes_per_elem: int = 2) -> int:
        return batch_size * self.inner * RecurrentState.bytes_per_elem(bytes_per_elem)

    def flops_breakdown(self, context_len: int, causal: bool = True) -> Flops:
        # projections, and the recurrence's multiply-add per channel in each of the chunked
        # scan's two passes (elementwise; gates are not counted)
        return Flops(linear=linear_flops(self.i_proj, self.f_proj, self.g_proj, self.o_proj), other=4.0 * self.inner)
