"""The Conformer block (Gulati et al. 2020, arXiv:2005.08100), a registered block kind:

    x = x + 1/2 FFN(norm x)             half-step FFN (macaron)
    x = x + MHSA(norm x)                the layer's mixer (attention: relative positions by RoPE)
    x = x + Conv(x)                     the convolution module below
    x = x + 1/2 FFN'(norm x)            a second half-step FFN of the same spec
    y = norm(x)                         final norm

Convolution module: LayerNorm, pointwise (d -> 2d), GLU, depthwise conv over time (kernel k),
LayerNorm in place of the paper's BatchNorm (a batch-independent norm: no statistics shared
across rows, so inference equals training and rows never mix), Swish, pointwise (d -> d).

Bidirectional (encoders): the depthwise conv is centred (k odd). Causal: it is causal (left
padding) and the block's cache holds the last k - 1 GLU outputs next to the mixer's cache, so
decoding equals the full forward. Self-attention with relative positions is the attention
mixer with RoPE (a relative position encoding: scores depend on i - j only) rather than
Transformer-XL's; the mixer is whatever the layer spec names.
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from speedlm.cache.composite import CompositeCache
from speedlm.errors import SpeedlmError
from speedlm.layers.block import LayerBlock
from speedlm.layers.dims import ModelDims
from speedlm.layers.flops import Flops
from speedlm.layers.mixer import SeqMeta, linear_flops
from speedlm.layers.norm import RMSNorm
from speedlm.layers.short_conv import ShortConv
from speedlm.registry import FFNS, Range


class ConvModule(nn.Module):
    def __init__(self, d: int, kernel: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(d, eps=eps)
        self.pointwise_in = nn.Linear(d, 2 * d)
        self.depthwise = ShortConv(d, kernel)  # its weights serve both directions; causal keeps a state
        self.conv_norm = nn.LayerNorm(d, eps=eps)
        self.pointwise_out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, meta: SeqMeta, cache=None) -> torch.Tensor:
        h = F.glu(self.pointwise_in(self.norm(x)), dim=-1)
        if meta.causal:
            h = self.depthwise(h, cache)
        else:  # centred: position t sees t - k//2 .. t + k//2
            k = self.depthwise.kernel
            h = F.conv1d(h.transpose(1, 2), self.depthwise.weight[:, None], self.depthwise.bias, padding=k // 2,
                         groups=h.shape[-1]).transpose(1, 2)
        return self.pointwise_out(F.silu(self.conv_norm(h)))

    def flops_per_token(self) -> float:
        return self.flops_breakdown().total

    def flops_breakdown(self, causal: bool = True) -> Flops:
        # the centred (bidirectional) depthwise conv is one F.conv1d; the causal one the ShortConv op
        depthwise = self.depthwise.flops_breakdown() if causal else Flops(matmul=self.depthwise.flops_per_token())
        return Flops(linear=linear_flops(self.pointwise_in, self.pointwise_out)) + depthwise


class ConformerBlock(LayerBlock):
    supports_reversible = False

    @classmethod
    def check_options(cls, dims: ModelDims, kernel: int = 15, **options) -> None:
        if kernel % 2 == 0:
            raise SpeedlmError(f"the Conformer conv kernel must be odd (centred in encoders), got {kernel}")

    def __init__(self, dims: ModelDims, mixer: dict, ffn: dict, kernel: Annotated[int, Range(min=1)] = 15):
        super().__init__(dims, mixer, ffn)
        d, eps = dims.d_model, dims.norm_eps
        built = FFNS.build(ffn, dims)
        self.ffn2 = None if built.is_empty else built
        self.ffn_norm = RMSNorm(d, eps) if self.ffn is not None else None
        self.mixer_norm = RMSNorm(d, eps)
        self.conv = ConvModule(d, kernel, eps)
        self.ffn2_norm = RMSNorm(d, eps) if self.ffn2 is not None else None
        self.final_norm = RMSNorm(d, eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in (self.conv.pointwise_in, self.conv.pointwise_out):
            nn.init.normal_(m.weight, 0.0, self.dims.init_std)
            nn.init.zeros_(m.bias)
        self.conv.depthwise.reset_parameters()
        for norm in (self.conv.norm, self.conv.conv_norm):
            norm.reset_parameters()

    def forward(self, x, meta: SeqMeta, cache: CompositeCache | None = None):
        if meta.doc_ids is not None:  # the attention mixer would honour them, the convolution would not
            raise SpeedlmError("the Conformer convolution would mix packed documents (doc_ids); train it on unpacked sequences")
        if self.ffn is not None:
            x = x + 0.5 * self.ffn(self.ffn_norm(x), meta)
        x = x + self.mixer(self.mixer_norm(x), meta, None if cache is None else cache["mixer"])
        x = x + self.conv(x, meta, None if cache is None else cache["conv"])
        if self.ffn2 is not None:
            x = x + 0.5 * self.ffn2(self.ffn2_norm(x), meta)
        return self.final_norm(x)

    # ----- what the model asks -----
    def init_cache(self, kv_policy=None) -> CompositeCache:
        return CompositeCache(mixer=self.mixer.init_cache(kv_policy), conv=self.conv.depthwise.init_cache())

    def state_bytes(self, context_len: int, batch_size: int = 1, bytes_per_elem: int = 2) -> int:
        conv = self.conv.depthwise.state_bytes(context_len, batch_size, bytes_per_elem)
        return conv + super().state_bytes(context_len, batch_size, bytes_per_elem)

    def own_flops_per_token(self) -> float:
        """FLOPs beyond the mixer and the (first) FFN: the convolution module and the second FFN."""
        return self.own_flops_breakdown().total

    def own_flops_breakdown(self, causal: bool = True) -> Flops:
        return self.conv.flops_breakdown(causal) + (self.ffn2.flops_breakdown() if self.ffn2 is not None else Flops())

    def own_reach(self) -> int:
        return self.conv.depthwise.kernel - 1  # the causal convolution after the mixer

    def residual_weights(self) -> list[torch.Tensor]:
        extra = [self.conv.pointwise_out.weight] + (self.ffn2.residual_weights() if self.ffn2 is not None else [])
        return super().residual_weights() + extra
