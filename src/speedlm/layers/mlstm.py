"""xLSTM's mLSTM layer (Beck et al. 2024, arXiv:2405.04517): the matrix-memory LSTM cell over heads
(ops/mlstm.py: exponential input gate, sigmoid forget gate, normaliser and stabiliser states),

    ig = W_i x + b_i,  lf = logsigmoid(W_f x + b_f)           one pair per head and token
    h  = mLSTM(q, k, v, lf, ig)                                chunked, stabilised
    y  = W_o( RMSNorm_heads(h) * sigmoid(W_og x) )

in the form of the xLSTM-7B layer: gates read the input x (the original block reads q, k, v),
a sigmoid output gate, a per-head norm; no up-projection block, causal convolution or learned
skip. Initialisation as the paper's code: gate weights zero, input-gate biases N(0, 0.1), forget-
gate biases spread linearly over [3, 6] across heads (slow forgetting, f = 0.95 .. 0.998).
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from speedlm.cache.recurrent import RecurrentState
from speedlm.layers.dims import ModelDims
from speedlm.layers.flops import Flops
from speedlm.layers.mixer import SeqMeta, linear_flops
from speedlm.layers.recurrent_heads import GatedHeadsMixer
from speedlm.ops.mlstm import mlstm_chunked, mlstm_recurrent
from speedlm.registry import Range


class MLSTM(GatedHeadsMixer):
    def __init__(self, dims: ModelDims, chunk_size: Annotated[int, Range(min=1)] = 64):
        super().__init__(dims, key_dim=dims.head_dim, value_dim=dims.head_dim, norm="rms", gate=False,
                         chunk_size=chunk_size)
        d = dims.d_model
        self.i_gate = nn.Linear(d, self.n_heads, bias=True)
        self.f_gate = nn.Linear(d, self.n_heads, bias=True)
        self.out_gate = nn.Linear(d, self.n_heads * self.value_dim, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        with torch.no_grad():
            nn.init.zeros_(self.i_gate.weight)
            nn.init.normal_(self.i_gate.bias, 0.0, 0.1)
            nn.init.zeros_(self.f_gate.weight)
            self.f_gate.bias.copy_(torch.linspace(3.0, 6.0, self.n_heads))

    def _gates(self, x, dt):
        """(lf, ig) (B, H, T) in the recurrence dtype."""
        lf = F.logsigmoid(self.f_gate(x).to(dt)).transpose(1, 2)
        return lf, self.i_gate(x).to(dt).transpose(1, 2)

    def mix(self, x, meta: SeqMeta, cache: RecurrentState | None = None):
        q, k, v = self.project(x)
        dt = self.recurrence_dtype(x)
        lf, ig = self._gates(x, dt)
        init = None if cache is None or cache.state is None else cache.state
        h, state = mlstm_chunked(q.to(dt), k.to(dt), v.to(dt), lf, ig, initial_state=init, chunk_size=self.chunk_size)
        if cache is not None:
            cache.state = state
        y = self.merge_heads(self.out_norm(h.to(x.dtype))) * torch.sigmoid(self.out_gate(x))
        return self.o_proj(y)

    def reference(self, x, meta: SeqMeta):
        q, k, v = self.reference_project(x)
        f = torch.einsum("btd,hd->bht", x, self.f_gate.weight) + self.f_gate.bias[:, None]
        ig = torch.einsum("btd,hd->bht", x, self.i_gate.weight) + self.i_gate.bias[:, None]
        h, _ = mlstm_recurrent(q, k, v, -torch.log1p(torch.exp(-f)), ig)
        gate = self._heads_of(x, self.out_gate.weight, self.n_heads)
        return self.reference_output(self.out_norm.reference(h) / (1 + torch.exp(-gate)))

    def state_elements_per_head(self) -> int:
        return self.key_dim * self.value_dim + self.key_dim + 1  # C, n and the stabiliser m

    def flops_breakdown(self, context_len: int, causal: bool = True) -> Flops:
        # as the chunked linear recurrences (scores, mix, state read and write), plus the
        # normaliser's read q . n (its write is a sum of weighted keys: elementwise)
        extra = self.n_heads * 2 * self.key_dim
        linear = self.projection_flops() + linear_flops(self.i_gate, self.f_gate, self.out_gate)
        return Flops(linear=linear, matmul=self.chunked_flops(context_len) + extra)
