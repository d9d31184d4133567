"""Attention restricted by a static pattern (a mask function on absolute positions).

A new static sparse mechanism is a pattern (ops/masks.py) plus a subclass of `AttentionBase`
that returns it and says which KV policy it allows; the backends in ops/sparse_attention.py
(FlexAttention on CUDA, gathered key blocks elsewhere), the KV cache, bidirectional mode and
the reference come with it.
"""

from __future__ import annotations

from typing import Annotated

import torch

from torch import nn

from speedlm.cache.buffer import TokenBuffer
from speedlm.cache.composite import CompositeCache
from speedlm.cache.kv import FullPolicy, WindowPolicy
from speedlm.errors import SpeedlmError
from speedlm.layers.attention import AttentionBase, Positions
from speedlm.layers.dims import ModelDims
from speedlm.layers.flops import Flops
from speedlm.ops.dilated_attention import DilatedWindow
from speedlm.ops.logsparse_attention import LogSparse
from speedlm.ops.masks import SlidingWindow, window_mean_keys
from speedlm.registry import Range


class SlidingWindowAttention(AttentionBase):
    """Each causal query sees itself and the `window - 1` previous tokens (Longformer's local
    band, Mistral's SWA); a bidirectional one sees window - 1 tokens on either side. Cache: the
    last window - 1 keys, whatever the context length."""

    def __init__(
        self,
        dims: ModelDims,
        window: Annotated[int, Range(min=1)] = 256,
        kv_heads: Annotated[int | None, Range(min=1)] = None,
        positions: Positions = "rope",
        qkv_bias: bool = False,
        qk_norm: bool = False,
        head_dim: Annotated[int | None, Range(min=1)] = None,
        rope_dim: Annotated[int | None, Range(min=2)] = None,
        output_gate: bool = False,
    ):
        # the projection and position options of AttentionBase (Qwen2's and Mistral's windowed layers)
        super().__init__(dims, kv_heads, positions, qkv_bias, qk_norm, head_dim, rope_dim, output_gate)
        self.window = window
        self._pattern = SlidingWindow(window)
        self.reset_parameters()

    def pattern(self):
        return self._pattern

    def default_policy(self):
        return WindowPolicy(self.window)

    def max_context(self, kv_policy=None):
        return None  # no query looks further back than the window, whatever the cache keeps

    def reach(self) -> int:
        return self.window - 1

    def _mean_keys(self, context_len: int) -> float:
        return window_mean_keys(context_len, self.window)


class DilatedWindowAttention(AttentionBase):
    """Dilated sliding window (Longformer): each causal query sees the keys at distances 0, d,
    ..., (window - 1) * d, with a dilation d per head (`dilation`: one int, or one per head;
    heads that share a KV head share their dilation). Reach (window - 1) * max(d) for window
    keys per query; runs as d sliding windows on residue classes (ops/dilated_attention.py).
    Cache: the last (window - 1) * max(d) keys."""

    @classmethod
    def check_options(cls, dims: ModelDims, window: int = 64, dilation: int | list[int] = 2,
                      kv_heads: int | None = None, **options) -> None:
        super().check_options(dims, kv_heads=kv_heads)
        if not isinstance(dilation, list):
            if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
                raise SpeedlmError(f"dilation must be an integer >= 1 or one per head, got {dilation!r}")
        else:
            if len(dilation) != dims.n_heads or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dilation):
                raise SpeedlmError(f"dilation must be one positive int per head ({dims.n_heads}), got {dilation}")
            per_kv = dims.n_heads // (kv_heads or dims.n_heads)
            if any(len(set(dilation[g : g + per_kv])) > 1 for g in range(0, dims.n_heads, per_kv)):
                raise SpeedlmError("heads that share a KV head must share their dilation")

    def __init__(
        self,
        dims: ModelDims,
        window: Annotated[int, Range(min=1)] = 64,
        dilation: int | list[int] = 2,
        kv_heads: Annotated[int | None, Range(min=1)] = None,
    ):
        super().__init__(dims, kv_heads)
        self.window = window
        self.dilations = list(dilation) if isinstance(dilation, list) else [dilation] * dims.n_heads
        by_dilation: dict[int, list[int]] = {}
        for h, d in enumerate(self.dilations):
            by_dilation.setdefault(d, []).append(h)
        self._groups = [(heads, DilatedWindow(window, d)) for d, heads in sorted(by_dilation.items())]
        self.reset_parameters()

    def pattern(self):
        return self._groups[0][1] if len(self._groups) == 1 else None

    def head_patterns(self):
        return None if len(self._groups) == 1 else self._groups

    def reach(self) -> int:
        """How far back the furthest key is: (window - 1) * the largest dilation."""
        return (self.window - 1) * max(self.dilations)

    def default_policy(self):
        return WindowPolicy(self.reach() + 1)

    def max_context(self, kv_policy=None):
        return None  # no query looks further back than the reach, whatever the cache keeps

    def _mean_keys(self, context_len: int) -> float:
        n = context_len
        per_head = []
        for d in self.dilations:  # position i sees min(window, i // d + 1) keys
            i = torch.arange(n, dtype=torch.float64, device="cpu")
            per_head.append(torch.clamp(torch.div(i, d, rounding_mode="floor") + 1, max=self.window).mean().item())
        return sum(per_head) / len(per_head)


def _unfold(x: torch.Tensor, kernel: int, history: torch.Tensor | None, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, D) -> (B, T, kernel * D): each token with the kernel - 1 inputs before it (from
    `history` (B, <= kernel - 1, D), then zeros), newest first: a causal convolution's input.
    With `doc_ids` (B, T) an input from another document counts as zero."""
    b, t, d = x.shape
    past = x.new_zeros(b, kernel - 1, d)
    if history is not None and history.shape[1]:
        h = history[:, -(kernel - 1) :]
        past = torch.cat([past[:, : kernel - 1 - h.shape[1]], h], dim=1)
    full = torch.cat([past, x], dim=1)  # (B, kernel - 1 + T, D)
    parts = []
    for j in range(kernel):
        shifted = full[:, kernel - 1 - j : kernel - 1 - j + t]
        if doc_ids is not None and j:
            same = torch.zeros(b, t, dtype=torch.bool, device=x.device)
            same[:, j:] = doc_ids[:, j:] == doc_ids[:, :-j]
            shifted = shifted * same[..., None].to(x.dtype)
        parts.append(shifted)
    return torch.cat(parts, dim=-1)


class LogSparseAttention(AttentionBase):
    """LogSparse (Li et al. 2019): each query sees itself and the keys at power-of-two distances
    (O(log T) keys), after a dense `local` window; `restart` restarts the pattern every that many
    positions (then the cache keeps restart - 1 keys). `conv_kernel` > 1 makes queries and keys
    causal convolutions of the last conv_kernel inputs (the paper's convolutional self-attention;
    1 is ordinary attention), with those inputs as a decode state beside the KV cache."""

    @classmethod
    def check_options(cls, dims: ModelDims, restart: int | None = None, kv_heads: int | None = None, **options) -> None:
        super().check_options(dims, kv_heads=kv_heads)
        if restart is not None and restart < 2:
            raise SpeedlmError(f"restart must be at least 2 positions, got {restart}")

    def __init__(
        self,
        dims: ModelDims,
        local: Annotated[int, Range(min=1)] = 1,
        restart: Annotated[int | None, Range(min=2)] = None,
        conv_kernel: Annotated[int, Range(min=1)] = 1,
        kv_heads: Annotated[int | None, Range(min=1)] = None,
    ):
        super().__init__(dims, kv_heads)
        self.local, self.restart, self.conv_kernel = local, restart, conv_kernel
        self._pattern = LogSparse(local, restart)
        if conv_kernel > 1:
            d = dims.d_model
            self.q_proj = nn.Linear(conv_kernel * d, self.n_heads * self.key_dim, bias=False)
            self.k_proj = nn.Linear(conv_kernel * d, self.kv_heads * self.key_dim, bias=False)
        self._qk_input = None
        self._reference_docs = None
        self.reset_parameters()

    def pattern(self):
        return self._pattern

    def reference(self, x, meta, policy=None):
        self._reference_docs = meta.doc_ids  # the convolution stays inside documents there too
        try:
            return super().reference(x, meta, policy)
        finally:
            self._reference_docs = None

    def default_policy(self):
        return WindowPolicy(self.restart) if self.restart is not None else FullPolicy()

    def max_context(self, kv_policy=None):
        if self.restart is not None:
            return None  # no query looks before its segment
        return super().max_context(kv_policy)

    def reach(self) -> int | None:
        """Within its segment under `restart` (None: the powers of two reach any distance), plus
        the convolution of queries and keys."""
        if self.restart is None:
            return None
        return max(self._pattern.distances(self.restart)) + self.conv_kernel - 1

    # ----- convolutional queries and keys -----
    def init_cache(self, kv_policy=None):
        kv = super().init_cache(kv_policy)
        if self.conv_kernel == 1:
            return kv
        return CompositeCache(kv=kv, conv=TokenBuffer(WindowPolicy(self.conv_kernel), n_entries=1))

    def mix(self, x, meta, cache=None):
        if self.conv_kernel == 1:
            return super().mix(x, meta, cache)
        conv = None if cache is None else cache["conv"]
        history = conv.entries()[0] if conv is not None and conv.length else None
        if conv is not None:
            conv.extend(x)
        self._qk_input = _unfold(x, self.conv_kernel, history, meta.doc_ids)
        try:
            return super().mix(x, meta, None if cache is None else cache["kv"])
        finally:
            self._qk_input = None

    def project(self, x):
        qk = x if self._qk_input is None else self._qk_input
        return (
            self.split_heads(self.q_proj(qk), self.n_heads),
            self.split_heads(self.k_proj(qk), self.kv_heads),
            self.split_heads(self.v_proj(x), self.kv_heads),
        )

    def reference_project(self, x):
        qk = _unfold(x, self.conv_kernel, None, self._reference_docs) if self.conv_kernel > 1 else x
        return (
            self._heads_of(qk, self.q_proj.weight, self.n_heads),
            self._heads_of(qk, self.k_proj.weight, self.kv_heads),
            self._heads_of(x, self.v_proj.weight, self.kv_heads),
        )

    def state_bytes(self, context_len: int, batch_size: int = 1, bytes_per_elem: int = 2) -> int:
        conv = batch_size * min(context_len, self.conv_kernel - 1) * self.dims.d_model * bytes_per_elem
        return super().state_bytes(context_len, batch_size, bytes_per_elem) + conv

    def flops_breakdown(self, context_len: int, causal: bool = True) -> Flops:
        # the same visible pairs as any pattern, but the distance walk (ops/logsparse_attention.py)
        # scores and mixes them with elementwise products, one distance at a time: the counter
        # sees only the projections
        f = super().flops_breakdown(context_len, causal)
        return Flops(linear=f.linear, other=f.matmul)

    def _mean_keys(self, context_len: int) -> float:
        seg = context_len if self.restart is None else min(context_len, self.restart)
        reach = torch.arange(1, seg + 1, dtype=torch.float64, device="cpu")  # position i of a segment sees distances < i + 1
        powers = [p for p in self._pattern.distances(seg) if p >= self.local]  # the log-spaced ones
        logspaced = (torch.tensor(powers, dtype=torch.float64, device="cpu")[None] < reach[:, None]).sum(1) if powers else 0
        return (torch.clamp(reach, max=self.local) + logspaced).mean().item()
