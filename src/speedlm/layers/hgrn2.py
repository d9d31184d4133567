"""HGRN2: gated linear RNN with state expansion (Qin et al. 2024, arXiv:2404.07904).

HGRN's element-wise recurrence h_t = f_t * h_{t-1} + (1 - f_t) * i_t widened by an outer
product: every forget channel carries a whole row of the input, so the state of a head is a
(Dk, Dv) matrix instead of a vector, with no new parameters. The forget gate takes the place
of the key's decay and its complement the place of the key, the output gate the query's:

    f_t = lb + (1 - lb) sigmoid(W_f x_t)                      (B, H, T, Dk)
    S_t = diag(f_t) S_{t-1} + (1 - f_t) i_t^T,   i_t = W_i x_t (B, H, T, Dv)
    o_t = S_t^T silu(W_q x_t) / sqrt(Dk)
    y_t = W_o RMSNorm(o_t)                                   (norm over the whole width)

which is gated linear attention with k = 1 - f and g = log f (ops/gla.py, chunked per channel);
this follows the paper's code (flash-linear-attention's HGRN2Attention: swish query, the
softmax scale of chunk_gla, one RMSNorm over the width, no output gate). Heads are
`expand_ratio` channels wide for both keys and values (fla's default 128; here the model's
head width, so that the state is d_model x head_dim like GLA's). The lower bound rises with
depth as in HGRN (layer_idx / n_layers, fixed; see layers/hgrn.py). As in the GLA mixer, log
forget gates are floored at -5 per step, the range where the chunked per-channel form is exact
in float32; the floor is part of the parameterisation, so the reference sees it too.
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from speedlm.cache.recurrent import RecurrentState
from speedlm.errors import SpeedlmError
from speedlm.layers.dims import ModelDims
from speedlm.layers.flops import Flops, attention_flops, chunk_visible_keys
from speedlm.layers.mixer import Mixer, SeqMeta, linear_flops
from speedlm.ops.gla import GLA, LOG_DECAY_FLOOR, gla_recurrent
from speedlm.registry import Range


class HGRN2(Mixer):
    residual_out = ("o_proj",)

    @classmethod
    def check_options(cls, dims: ModelDims, expand_ratio: int | None = None, **options) -> None:
        if expand_ratio is not None and dims.d_model % expand_ratio:
            raise SpeedlmError(f"hgrn2: expand_ratio={expand_ratio} must divide d_model={dims.d_model}")

    def __init__(
        self,
        dims: ModelDims,
        expand_ratio: Annotated[int | None, Range(min=1)] = None,
        lower_bound: Annotated[float | None, Range(min=0.0, max=0.99)] = None,
        chunk_size: Annotated[int, Range(min=1)] = 64,
    ):
        super().__init__(dims)
        d = dims.d_model
        self.head_dim = dims.head_dim if expand_ratio is None else expand_ratio
        self.n_heads = d // self.head_dim
        self.key_dim = self.value_dim = self.head_dim  # the chunked GLA form's widths
        self.chunk_size = chunk_size
        self.lower_bound = dims.layer_idx / dims.n_layers if lower_bound is None else lower_bound
        self.q_proj, self.f_proj, self.i_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.norm_weight = nn.Parameter(torch.ones(d))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.ones_(self.norm_weight)

    def _heads(self, y: torch.Tensor) -> torch.Tensor:
        b, t, _ = y.shape
        return y.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)

    def _log_forget(self, f: torch.Tensor) -> torch.Tensor:
        """log(lb + (1 - lb) sigmoid(f)), floored at -LOG_DECAY_FLOOR (module doc)."""
        lb = self.lower_bound
        g = F.logsigmoid(f) if lb == 0.0 else torch.log(lb + (1 - lb) * torch.sigmoid(f))
        return g.clamp_min(-LOG_DECAY_FLOOR)

    def mix(self, x, meta: SeqMeta, cache: RecurrentState | None = None):
        dt = RecurrentState.dtype_for(x.dtype)
        g = self._heads(self._log_forget(self.f_proj(x).to(dt)))
        q = self._heads(F.silu(self.q_proj(x)).to(dt))
        i = self._heads(self.i_proj(x).to(dt))
        init = None if cache is None or cache.state is None else cache.state[0]
        o, state = GLA(q, -torch.expm1(g), i, g, initial_state=init, chunk_size=self.chunk_size)
        if cache is not None:
            cache.state = (state,)
        o = o.transpose(1, 2).reshape(x.shape).to(x.dtype)
        return self.o_proj(F.rms_norm(o, (self.dims.d_model,), self.norm_weight, self.dims.norm_eps))

    def reference(self, x, meta: SeqMeta):
        q, f, i = (torch.einsum("btd,ed->bte", x, p.weight) for p in (self.q_proj, self.f_proj, self.i_proj))
        lb = self.lower_bound
        g = self._heads(torch.log(lb + (1 - lb) / (1 + torch.exp(-f))).clamp_min(-LOG_DECAY_FLOOR))
        o, _ = gla_recurrent(self._heads(q / (1 + torch.exp(-q))), 1 - torch.exp(g), self._heads(i), g)
        o = o.transpose(1, 2).reshape(x.shape)
        o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + self.dims.norm_eps) * self.norm_weight
        return torch.einsum("btd,ed->bte", o, self.o_proj.weight)

    def init_cache(self, kv_policy=None):
        return RecurrentState()

    def state_bytes(self, context_len: int, batch_size: int = 1, bytes_per_elem: int = 2) -> int:
        elems = self.n_heads * self.head_dim * self.head_dim
        return batch_size * elems * RecurrentState.bytes_per_elem(bytes_per_elem)

    def flops_breakdown(self, context_len: int, causal: bool = True) -> Flops:
        # the chunked GLA form (ops/gla.py): causal half of each chunk's scores and mix, the
        # carried state's read and the chunk's write, per head (as GatedHeadsMixer.chunked_flops)
        keys, dk = chunk_visible_keys(context_len, self.chunk_size), self.head_dim
        matmul = self.n_heads * (attention_flops(1, keys, dk, dk) + 4 * dk * dk)
        return Flops(linear=linear_flops(self.q_proj, self.f_proj, self.i_proj, self.o_proj), matmul=matmul)
