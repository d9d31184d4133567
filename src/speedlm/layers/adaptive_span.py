"""Adaptive Attention Span (Sukhbaatar et al. 2019, arXiv:1905.07799): causal softmax attention
(RoPE, GQA) where every head learns how far back it looks.

- Head h has a span z_h = max_span * clamp(span_h, 0, 1) (`span`: the paper's `current_val`, a
  fraction) and weights its keys by the soft mask m(x) = clamp((R + z_h - x) / R, 0, 1) of the
  distance x, renormalised after the softmax (ops/adaptive_span_attention.py); R = `ramp`. Keys
  at distance >= max_span are never seen (the paper's attention span).
- The span is trained by the language-model loss through the keys on the ramp and shrunk by
  the auxiliary loss `adaptive_span` = penalty * mean_h z_h per layer (the paper's
  `loss_coeff * max_span * current_val.mean()`; its enwik8-small coefficient 2e-6 by default).
- Attention and cache are trimmed to the current reach ceil(max_h z_h) + R (capped at max_span):
  the blocked op scores only those keys, the default KV policy is a window of that reach, so cost
  and memory follow the learned spans. The reach is read from the parameters once per call (one
  host sync, as the paper's `get_current_max_size`); a cache is sized for the spans at the time
  it is made (inference: fixed parameters).
- Clamping: the paper clamps `current_val` to [0, 1] after every optimizer step. The trainer has
  no per-module post-step hook, so the forward pass clamps instead, with a gradient that still
  passes outside [0, 1] when a descent step moves the span back inside: a plain clamp would
  freeze a head for good once the penalty pushed it below 0.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
from torch import nn

from speedlm.cache.kv import WindowPolicy
from speedlm.errors import SpeedlmError
from speedlm.layers.attention import AttentionBase
from speedlm.layers.dims import ModelDims
from speedlm.layers.mixer import SeqMeta
from speedlm.layers.rope import rope_reference
from speedlm.ops.adaptive_span_attention import adaptive_span_attention, adaptive_span_attention_reference
from speedlm.ops.masks import window_mean_keys
from speedlm.registry import Range


class _ClampToUnit(torch.autograd.Function):
    """clamp(z, 0, 1) whose gradient is kept outside [0, 1] where descent (-grad) points back
    inside: the forward-pass stand-in for the paper's clamp after each step."""

    @staticmethod
    def forward(ctx, z):
        ctx.save_for_backward(z)
        return z.clamp(0, 1)

    @staticmethod
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        keep = ((z >= 0) & (z <= 1)) | ((z < 0) & (grad < 0)) | ((z > 1) & (grad > 0))
        return grad * keep


class AdaptiveSpanAttention(AttentionBase):
    supports_bidirectional = False  # a span is a distance into the past (the paper's causal LM)
    supports_doc_ids = True
    data_dependent_flops = True  # cost follows the learned spans

    @classmethod
    def reversible_problem(cls, **options) -> str | None:
        return "adaptive span adds its span penalty as an auxiliary loss, which a recomputed forward cannot carry"

    @classmethod
    def check_options(cls, dims: ModelDims, init_span: float | list[float] = 0.0, kv_heads=None, **options) -> None:
        super().check_options(dims, kv_heads=kv_heads)
        spans = init_span if isinstance(init_span, list) else [init_span]
        if isinstance(init_span, list) and len(init_span) != dims.n_heads:
            raise SpeedlmError(f"init_span must be one fraction or one per head ({dims.n_heads}), got {init_span}")
        if any(isinstance(s, bool) or not 0 <= s <= 1 for s in spans):
            raise SpeedlmError(f"init_span is a fraction of max_span in [0, 1] (one, or one per head), got {init_span}")

    def __init__(
        self,
        dims: ModelDims,
        max_span: Annotated[int, Range(min=1)] = 1024,
        ramp: Annotated[int, Range(min=1)] = 32,
        init_span: float | list[float] = 0.0,
        penalty: Annotated[float, Range(min=0)] = 2e-6,
        kv_heads: Annotated[int | None, Range(min=1)] = None,
    ):
        super().__init__(dims, kv_heads)
        self.max_span, self.ramp, self.penalty = max_span, ramp, penalty
        self.init_span = list(init_span) if isinstance(init_span, list) else [init_span] * self.n_heads
        self.span = nn.Parameter(torch.empty(self.n_heads))
        self._call = None  # (spans, reach) of the running call: read once, used by every step of it
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        with torch.no_grad():
            self.span.copy_(torch.tensor(self.init_span, dtype=self.span.dtype))

    # ----- spans -----
    def spans(self) -> torch.Tensor:
        """(H,) each head's span z_h in tokens."""
        return _ClampToUnit.apply(self.span) * self.max_span

    def _reach_of(self, spans: torch.Tensor) -> int:
        # m > 0 exactly at distances x < z + R, i.e. x < ceil(z) + R for integer x and R
        if spans.is_meta:  # planning on the meta device (speedlm compare): the initial spans
            return min(self.max_span, math.ceil(max(self.init_span) * self.max_span) + self.ramp)
        return min(self.max_span, math.ceil(spans.detach().max().item()) + self.ramp)

    def span_window(self) -> int:
        """How many distances (0, 1, ...) a query reads now: ceil(max_h z_h) + ramp, at most max_span."""
        return self._call[1] if self._call is not None else self._reach_of(self.spans())

    def reach(self) -> int:
        """Positions back a query can see (the `Mixer.reach` contract): the window less itself."""
        return self.span_window() - 1

    def learned_summary(self) -> dict:
        """Each head's span in tokens, as learned, and the window the cache keeps for them."""
        with torch.no_grad():
            spans = self.spans()
        if spans.is_meta:
            return {}
        return {"spans": [round(float(z), 1) for z in spans], "span_window": self.span_window()}

    # ----- attention -----
    def default_policy(self):
        return WindowPolicy(self.span_window())

    def max_context(self, kv_policy=None):
        return None  # no query looks further back than max_span, whatever the cache keeps

    def mix(self, x, meta: SeqMeta, cache=None):
        spans = self.spans()
        if meta.aux is not None:
            meta.aux.add("adaptive_span", self.penalty * spans.mean())
        self._call = (spans, self._reach_of(spans))
        try:
            return super().mix(x, meta, cache)  # RoPE, the KV cache and its policy; `_attend` below
        finally:
            self._call = None

    def _attend(self, q, k, v, mask):
        spans, reach = self._call
        return adaptive_span_attention(q, k, v, mask, spans, self.ramp, reach)

    def reference(self, x, meta: SeqMeta, policy=None):
        """Dense float64-able form with the explicit soft mask: keys within max_span, causal, in
        the same document, and (given a `policy`) what that lossy cache keeps; no trimming."""
        b, t, _ = x.shape
        q, k, v = self.reference_project(x)
        pos = meta.position_tensor(t, x.device)
        q, k = rope_reference(q, pos, self.rope_theta), rope_reference(k, pos, self.rope_theta)
        qp, kp = pos[:, :, None], pos[:, None, :]
        idx = torch.arange(t, device=x.device)
        allowed = (idx[None, :] <= idx[:, None]) & (qp - kp < self.max_span)
        if meta.doc_ids is not None:
            allowed = allowed & (meta.doc_ids[:, :, None] == meta.doc_ids[:, None, :])
        if policy is not None:
            marks = policy.mark(meta.token_ids, pos, t, x.device)
            extra = policy.visible(qp, kp, None if marks is None else marks[:, None, :])
            if extra is not None:
                allowed = allowed & extra
        allowed = allowed.expand(b, t, t)
        y = adaptive_span_attention_reference(q, k, v, allowed, (qp - kp).expand(b, t, t), self.spans(), self.ramp)
        return self.reference_output(y)

    def head_windows(self) -> list[int]:
        """How many distances each head reads now, ceil(z_h) + ramp (its soft mask is > 0 below
        z_h + R), at most max_span: the keys each head's queries see, for FLOPs."""
        if self.span.is_meta:  # built on the meta device (planning) there are no values: the initial spans
            spans = [f * self.max_span for f in self.init_span]
        else:
            spans = (self.span.detach().clamp(0, 1) * self.max_span).tolist()
        return [min(self.max_span, math.ceil(z) + self.ramp) for z in spans]

    def _mean_keys(self, context_len: int) -> float:
        # each head's visible keys at its current span, averaged over the heads (the blocked op
        # reads every head's keys up to the largest reach: executed/counted shows that)
        windows = self.head_windows()
        return sum(window_mean_keys(context_len, w) for w in windows) / len(windows)
