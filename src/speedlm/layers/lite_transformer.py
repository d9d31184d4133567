"""Lite Transformer's long-short range attention, LSRA (Wu et al. 2020, arXiv:2004.11886): the
channels are split in two; one half runs self-attention (global context: the attention mixer
at half width, half the heads, with its RoPE, KV cache and policies), the other a convolution
branch (local context): Linear -> GLU -> lightweight or dynamic convolution -> Linear. The
halves are concatenated and projected (an output projection into the residual stream, which
the paper leaves to the FFN).

Lightweight convolution (Wu et al. 2019, arXiv:1901.10430): a depthwise kernel of `kernel`
taps, softmax-normalised over the taps and shared by the channels of each of `conv_heads`
groups. Dynamic convolution: the same, but each position predicts its own kernel from its
input (a linear map to conv_heads x kernel taps). Causal models convolve over the current and
kernel - 1 previous positions (the cache keeps the last kernel - 1 inputs); encoders over a
centred window (kernel odd).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import nn

from speedlm.cache.buffer import TokenBuffer
from speedlm.cache.composite import CompositeCache
from speedlm.cache.kv import WindowPolicy
from speedlm.errors import SpeedlmError
from speedlm.layers.attention import Attention
from speedlm.layers.dims import ModelDims
from speedlm.layers.flops import Flops
from speedlm.layers.mixer import Mixer, SeqMeta, linear_flops
from speedlm.registry import Range


def _windows(x: torch.Tensor, kernel: int, causal: bool, history: torch.Tensor | None = None) -> torch.Tensor:
    """x (B, T, C) -> (B, T, kernel, C): each position's kernel inputs (zeros outside; `history`:
    the inputs before x, causal only)."""
    t = x.shape[1]
    if causal:
        before = x.new_zeros(x.shape[0], kernel - 1, x.shape[2]) if history is None else history
        if before.shape[1] < kernel - 1:
            before = torch.cat([x.new_zeros(x.shape[0], kernel - 1 - before.shape[1], x.shape[2]), before], 1)
        full = torch.cat([before[:, before.shape[1] - (kernel - 1) :], x], dim=1)
    else:
        full = F.pad(x, (0, 0, kernel // 2, kernel // 2))
    return full.unfold(1, kernel, 1)[:, :t].transpose(-1, -2)  # (B, T, K, C)


class LiteTransformerLSRA(Mixer):
    supports_bidirectional = True
    supports_doc_ids = False  # the convolution would read across packed documents
    residual_out = ("o_proj",)

    @classmethod
    def check_options(cls, dims: ModelDims, kernel: int = 7, conv_heads: int = 4, kv_heads=None, **options) -> None:
        if dims.n_heads % 2 or dims.d_model % 2:
            raise SpeedlmError(f"LSRA splits the channels and heads in two: n_heads={dims.n_heads} and d_model={dims.d_model} must be even")
        if kernel % 2 == 0:
            raise SpeedlmError(f"the LSRA convolution kernel must be odd (centred in encoders), got {kernel}")
        if (dims.d_model // 2) % conv_heads:
            raise SpeedlmError(f"conv_heads={conv_heads} must divide the convolution branch's {dims.d_model // 2} channels")
        if kv_heads is not None and (dims.n_heads // 2) % kv_heads:
            raise SpeedlmError(f"kv_heads={kv_heads} must divide the attention branch's {dims.n_heads // 2} heads")

    def __init__(
        self,
        dims: ModelDims,
        kernel: Annotated[int, Range(min=1)] = 7,
        conv: Literal["lightweight", "dynamic"] = "lightweight",
        conv_heads: Annotated[int, Range(min=1)] = 4,
        kv_heads: Annotated[int | None, Range(min=1)] = None,
    ):
        super().__init__(dims)
        half = dims.d_model // 2
        self.half, self.kernel, self.conv, self.conv_heads = half, kernel, conv, conv_heads
        self.attn = Attention(replace(dims, d_model=half, n_heads=dims.n_heads // 2), kv_heads)
        self.conv_in = nn.Linear(half, 2 * half, bias=False)
        self.kernel_weight = nn.Parameter(torch.empty(conv_heads, kernel)) if conv == "lightweight" else None
        self.kernel_proj = nn.Linear(half, conv_heads * kernel, bias=False) if conv == "dynamic" else None
        self.conv_out = nn.Linear(half, half, bias=False)
        self.o_proj = nn.Linear(dims.d_model, dims.d_model, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()  # every Linear N(0, init_std), the attention branch's included
        if self.kernel_weight is not None:
            nn.init.normal_(self.kernel_weight, 0.0, 1.0)

    # ----- the convolution branch -----
    def _kernels(self, u: torch.Tensor) -> torch.Tensor:
        """(B, T, conv_heads, kernel) softmax-normalised taps (lightweight: the same at every position)."""
        if self.kernel_weight is not None:
            return torch.softmax(self.kernel_weight, dim=-1).expand(*u.shape[:2], -1, -1)
        return torch.softmax(self.kernel_proj(u).view(*u.shape[:2], self.conv_heads, self.kernel), dim=-1)

    def _conv_branch(self, x, causal: bool, cache: TokenBuffer | None):
        u = F.glu(self.conv_in(x), dim=-1)  # (B, T, half)
        history = None
        if cache is not None:
            history = cache.entries()[0] if cache.length else None
            cache.extend(u)
        win = _windows(u, self.kernel, causal, history)  # (B, T, K, half)
        b, t, k, c = win.shape
        w = self._kernels(u)  # (B, T, Hc, K): the heads' taps, shared by each head's channels
        y = torch.einsum("btkhc,bthk->bthc", win.view(b, t, k, self.conv_heads, c // self.conv_heads), w)
        return self.conv_out(y.reshape(b, t, c))

    def mix(self, x, meta: SeqMeta, cache: CompositeCache | None = None):
        a, c = x[..., : self.half], x[..., self.half :]
        ya = self.attn(a, meta, None if cache is None else cache["attn"])
        yc = self._conv_branch(c, meta.causal, None if cache is None else cache["conv"])
        return self.o_proj(torch.cat([ya, yc], dim=-1))

    def reference(self, x, meta: SeqMeta, policy=None):
        a, c = x[..., : self.half], x[..., self.half :]
        ya = self.attn.reference(a, meta, policy)
        u = F.glu(c @ self.conv_in.weight.t(), dim=-1)
        w = self._kernels(u)
        t, k, per = u.shape[1], self.kernel, self.half // self.conv_heads
        cols = []
        for i in range(t):  # each position's taps written out
            acc = u.new_zeros(u.shape[0], self.half)
            for j in range(k):
                src = i - (k - 1) + j if meta.causal else i - k // 2 + j
                if 0 <= src < t:
                    acc = acc + u[:, src] * w[:, i, :, j].repeat_interleave(per, dim=-1)
            cols.append(acc)
        yc = torch.stack(cols, 1) @ self.conv_out.weight.t()
        return torch.cat([ya, yc], dim=-1) @ self.o_proj.weight.t()

    # ----- what the model asks -----
    def init_cache(self, kv_policy=None) -> CompositeCache:
        return CompositeCache(attn=self.attn.init_cache(kv_policy), conv=TokenBuffer(WindowPolicy(self.kernel), n_entries=1))

    def state_bytes(self, context_len: int, batch_size: int = 1, bytes_per_elem: int = 2) -> int:
        conv = batch_size * min(context_len, self.kernel - 1) * self.half * bytes_per_elem
        return self.attn.state_bytes(context_len, batch_size, bytes_per_elem) + conv

    def flops_breakdown(self, context_len: int, causal: bool = True) -> Flops:
        # the convolution branch: its projections (and the dynamic kernels'), and the taps (an einsum)
        linears = [self.conv_in, self.conv_out, self.o_proj] + ([self.kernel_proj] if self.kernel_proj is not None else [])
        conv = Flops(linear=linear_flops(*linears), matmul=2.0 * self.kernel * self.half)
        return self.attn.flops_breakdown(context_len, causal) + conv

    def max_context(self, kv_policy=None):
        return self.attn.max_context(kv_policy)

    @property
    def kv_heads(self) -> int:  # the contract's cache-size bounds ask attention mixers for these
        return self.attn.kv_heads

    @property
    def head_dim(self) -> int:
        return self.attn.head_dim
