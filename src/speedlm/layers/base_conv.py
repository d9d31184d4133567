"""BaseConv: a gated short convolution (Arora et al. 2023, Zoology, arXiv:2312.04927; the
convolution layers of Based, arXiv:2402.18668):

    y = W_o( (W_p x) * conv_k(W_c x) )        conv_k: causal depthwise, kernel k

It mixes only the last k tokens, so its decode state is the last k - 1 inputs of the
convolution (a TokenBuffer under a window policy, `ShortConv`).
"""

from __future__ import annotations

from typing import Annotated

import torch
from torch import nn

from speedlm.layers.dims import ModelDims
from speedlm.layers.flops import Flops
from speedlm.layers.mixer import Mixer, SeqMeta, linear_flops
from speedlm.layers.short_conv import ShortConv
from speedlm.registry import Range


class BaseConv(Mixer):
    residual_out = ("o_proj",)

    def __init__(self, dims: ModelDims, kernel: Annotated[int, Range(min=1)] = 3):
        super().__init__(dims)
        d = dims.d_model
        self.p_proj, self.c_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.conv = ShortConv(d, kernel)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self.conv.reset_parameters()

    def mix(self, x, meta: SeqMeta, cache=None):
        return self.o_proj(self.p_proj(x) * self.conv(self.c_proj(x), cache))

    def reference(self, x, meta: SeqMeta):
        gate = torch.einsum("btd,ed->bte", x, self.p_proj.weight)
        conv = self.conv.reference(torch.einsum("btd,ed->bte", x, self.c_proj.weight))
        return torch.einsum("bte,de->btd", gate * conv, self.o_proj.weight)

    def init_cache(self, kv_policy=None):
        return self.conv.init_cache()

    def state_bytes(self, context_len: int, batch_size: int = 1, bytes_per_elem: int = 2) -> int:
        return self.conv.state_bytes(context_len, batch_size, bytes_per_elem)

    def reach(self) -> int:
        return self.conv.kernel - 1  # the causal convolution: nothing else mixes positions

    def flops_breakdown(self, context_len: int, causal: bool = True) -> Flops:
        return Flops(linear=linear_flops(self.p_proj, self.c_proj, self.o_proj)) + self.conv.flops_breakdown()
