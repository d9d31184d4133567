"""The FFN contract: position-wise x (B, T, D) -> (B, T, D), chosen per layer by registered name
(`swiglu`, `none`; MoE later). `forward` takes the SeqMeta so routed FFNs can add auxiliary
losses (meta.aux)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from speedlm.layers.dims import ModelDims
from speedlm.layers.flops import Flops
from speedlm.layers.mixer import SeqMeta, init_linears


class FFN(nn.Module):
    residual_out: ClassVar[tuple[str, ...]] = ()
    # `none`: the block skips the FFN and its norm entirely
    is_empty: ClassVar[bool] = False
    # each token's output depends on that token alone (so ffn_chunks may split the sequence)
    position_wise: ClassVar[bool] = True

    def __init__(self, dims: ModelDims):
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor, meta: SeqMeta) -> torch.Tensor:
        raise NotImplementedError

    def flops_per_token(self) -> float:
        """Forward FLOPs per token (layers/flops.py)."""
        return self.flops_breakdown().total

    def flops_breakdown(self) -> Flops:
        """The count split by what FlopCounterMode sees (layers/flops.py)."""
        raise NotImplementedError

    def reset_parameters(self) -> None:
        init_linears(self, self.dims.init_std)

    def residual_weights(self) -> list[torch.Tensor]:
        return [getattr(self, name).weight for name in self.residual_out]


class NoFFN(FFN):
    """No feed-forward sublayer (e.g. Mamba blocks, whose mixer has its own expansion)."""

    is_empty = True

    def forward(self, x, meta):
        return torch.zeros_like(x)

    def flops_breakdown(self) -> Flops:
        return Flops()
