from __future__ import annotations

from typing import Annotated

import torch.nn.functional as F
from torch import nn

from speedlm.layers.dims import ModelDims
from speedlm.layers.ffn import FFN
from speedlm.layers.flops import Flops
from speedlm.registry import Range


class SwiGLU(FFN):
    """Gated MLP (Shazeer 2020, arXiv:2002.05202): down(silu(gate(x)) * up(x)). `hidden`
    defaults to the model's ffn_hidden (8/3 d_model rounded up to a multiple of 64)."""

    residual_out = ("down",)

    def __init__(self, dims: ModelDims, hidden: Annotated[int | None, Range(min=1)] = None):
        super().__init__(dims)
        hidden = dims.hidden_dim if hidden is None else hidden
        self.gate = nn.Linear(dims.d_model, hidden, bias=False)
        self.up = nn.Linear(dims.d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, dims.d_model, bias=False)
        self.reset_parameters()

    def forward(self, x, meta=None):
        return self.down(F.silu(self.gate(x)) * self.up(x))

    def flops_breakdown(self) -> Flops:
        return Flops(linear=2.0 * 3 * self.gate.in_features * self.gate.out_features)
