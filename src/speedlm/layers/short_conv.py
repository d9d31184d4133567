"""A causal depthwise convolution with its own decode state: the last kernel - 1 inputs, kept in
the same TokenBuffer that holds KV entries (cache/buffer.py) under a window policy. Mixers that
mix a few neighbouring tokens before their main operator (Mamba, DeltaNet, Based) compose it and
put its state in a CompositeCache next to theirs."""

from __future__ import annotations

import math

import torch
from torch import nn

from speedlm.cache.buffer import TokenBuffer
from speedlm.cache.kv import WindowPolicy
from speedlm.errors import SpeedlmError
from speedlm.layers.flops import Flops
from speedlm.ops.conv import SHIFTED_MAX_TAPS, causal_conv1d, causal_conv1d_reference


class ShortConv(nn.Module):
    def __init__(self, channels: int, kernel: int = 4, bias: bool = True):
        super().__init__()
        if kernel < 1:
            raise SpeedlmError(f"conv kernel must be >= 1, got {kernel}")
        self.kernel = kernel
        self.weight = nn.Parameter(torch.empty(channels, kernel))
        self.bias = nn.Parameter(torch.empty(channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv1d's default for a depthwise filter: U(-1/sqrt(K), 1/sqrt(K))
        bound = 1.0 / math.sqrt(self.kernel)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def init_cache(self) -> TokenBuffer:
        return TokenBuffer(WindowPolicy(self.kernel), n_entries=1)

    def forward(self, x: torch.Tensor, cache: TokenBuffer | None = None) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D); with a cache, continues after the inputs it holds."""
        if cache is None:
            return causal_conv1d(x, self.weight, self.bias)
        history = cache.entries()[0] if cache.length else None
        cache.extend(x)
        return causal_conv1d(x, self.weight, self.bias, history)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return causal_conv1d_reference(x, self.weight, self.bias)

    def state_bytes(self, context_len: int, batch_size: int, bytes_per_elem: int) -> int:
        return batch_size * min(context_len, self.kernel - 1) * self.weight.shape[0] * bytes_per_elem

    def flops_per_token(self) -> float:
        return 2.0 * self.weight.numel()

    def flops_breakdown(self) -> Flops:
        # up to SHIFTED_MAX_TAPS taps the op is shifted multiply-adds (elementwise); beyond, F.conv1d
        short = self.kernel <= SHIFTED_MAX_TAPS
        return Flops(other=self.flops_per_token()) if short else Flops(matmul=self.flops_per_token())
