"""Attention patterns, and the masks the attention backends consume.

A *pattern* is a shape on absolute positions, `pattern(q_pos, k_pos) -> bool` on broadcastable
long tensors (True = may attend), with no notion of causality: `SlidingWindow(w)` is the band
|q - k| < w. Later sparse mechanisms (dilated windows, Longformer, LogSparse, ...) supply only
such a function. Patterns are frozen dataclasses, hashable by value, so block plans and block
masks can be cached per pattern.

An `AttentionMask` is what a backend sees: a pattern placed on concrete queries and keys. It
is a function of *indices* (query i in 0..Tq-1, key j in 0..Tk-1), like FlexAttention's
mask_mod:

    allowed(i, j) = pattern(q_pos[i], k_pos[j])
                    & (not causal or j <= i + Tk - Tq)      queries are the last Tq keys
                    & (q_doc[i] == k_doc[j])                 when documents are packed
                    & (q_pos[i] - k_pos[j] < window or k_mark[j])  under a lossy KV policy

The last term is a KV policy's restriction on top of the mixer's pattern (cache/kv.py): a local
`window`, and per-key `k_mark`s (initial tokens, separators) that the window never drops.
Marks are data, not positions, so marked masks are never cached; with a Full pattern they run
on ops/marked_attention.py, whose cost follows the keys actually kept.

Positions are an int start (contiguous and shared by every row: the common case, which lets
kernels use `is_causal` and cached plans) or explicit (B or 1, T) long tensors: per-row
positions, or the non-contiguous key positions of a lossy KV cache. Causality is by order
(index), positions feed the pattern (and RoPE, elsewhere).

Index tensors passed to an `AttentionMask` carry a leading batch dimension (1 when shared by
every row); its result has a leading dimension of 1 (batch-independent) or B.

Block plans (ops/sparse_attention.py) find the key blocks each query block touches without
evaluating the pattern over every query x key pair, from two optional pattern methods:

- `distance_range() -> (lo, hi)`: the pattern is exactly the band lo <= q - k <= hi (None: no
  bound on that side). With contiguous positions each query block's keys are then one range of
  key blocks, computed in O(T / block).
- `may_attend(q_min, q_max, k_min, k_max) -> bool`: on broadcastable tensors of position ranges
  (a query block's, a key block's), True wherever some pair in the ranges may be allowed. It may
  say True too often (the plan then gathers a block it masks out), never too rarely.

A pattern with neither is evaluated over every pair, one slab of queries at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Full:
    """Every key: full attention (causality comes from the mask, not the pattern)."""

    def __call__(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(q_pos - k_pos, dtype=torch.bool)

    def distance_range(self) -> tuple[None, None]:
        return None, None

    def may_attend(self, q_min, q_max, k_min, k_max) -> torch.Tensor:
        return torch.ones_like(q_min - k_max, dtype=torch.bool)


@dataclass(frozen=True)
class SlidingWindow:
    """Keys within `window` positions: a causal query sees itself and the window - 1 keys
    before it; a bidirectional one sees window - 1 keys on each side (Longformer's band)."""

    window: int

    def __call__(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        return (q_pos - k_pos).abs() < self.window

    def distance_range(self) -> tuple[int, int]:
        return 1 - self.window, self.window - 1

    def may_attend(self, q_min, q_max, k_min, k_max) -> torch.Tensor:
        # the distances q - k of the ranges span [q_min - k_max, q_max - k_min]: do they meet the band?
        return (q_min - k_max < self.window) & (k_min - q_max < self.window)


def window_mean_keys(context_len: int, window: int) -> float:
    """Mean number of keys a causal query sees under a window of `window` over `context_len`
    tokens: positions 0..window-1 see i + 1 keys (the ramp), the rest see `window`."""
    n, w = context_len, window
    ramp = min(n, w)
    return (ramp * (ramp + 1) / 2 + max(0, n - w) * w) / n


def _gather(pos: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """pos (Bp, T) at idx (Bi, *s) -> (max(Bp, Bi), *s)."""
    b = max(pos.shape[0], idx.shape[0])
    flat = idx.reshape(idx.shape[0], -1).expand(b, -1)
    return pos.expand(b, -1).gather(1, flat).view(b, *idx.shape[1:])


def _pick(pos: torch.Tensor, b, i):
    """pos (Bp, T) at row b (or 0 when shared), index i: for FlexAttention's scalar mask_mod."""
    return pos[b if pos.shape[0] > 1 else 0, i]


@dataclass(frozen=True, eq=False)
class AttentionMask:
    pattern: object
    tq: int
    tk: int
    q_pos: int | torch.Tensor = 0
    k_pos: int | torch.Tensor = 0
    causal: bool = True
    q_doc: torch.Tensor | None = None
    k_doc: torch.Tensor | None = None
    window: int | None = None  # a KV policy's local window (None: the pattern alone)
    k_mark: torch.Tensor | None = None  # (B|1, Tk) bool: keys the window never drops

    @property
    def contiguous(self) -> bool:
        """Positions are int starts and there are no documents or marks: the mask is a pure
        function of (pattern, shapes, offsets), cacheable and the same for every row."""
        return (
            isinstance(self.q_pos, int) and isinstance(self.k_pos, int) and self.q_doc is None and self.k_mark is None
        )

    @property
    def plan_key(self):
        key = (self.pattern, self.tq, self.tk, self.q_pos, self.k_pos, self.causal, self.window)
        return key if self.contiguous else None

    @property
    def batch(self) -> int:
        """Leading dimension of the mask: 1 if every row shares it, else B."""
        parts = (self.q_pos, self.k_pos, self.q_doc, self.k_doc, self.k_mark)
        return max([1, *(t.shape[0] for t in parts if isinstance(t, torch.Tensor))])  # no max(default=): torch.compile traces this

    def __call__(self, qi: torch.Tensor, kj: torch.Tensor) -> torch.Tensor:
        """qi, kj: broadcastable index tensors with a leading batch dim (1 or B)."""
        qp = self.q_pos + qi if isinstance(self.q_pos, int) else _gather(self.q_pos, qi)
        kp = self.k_pos + kj if isinstance(self.k_pos, int) else _gather(self.k_pos, kj)
        m = self.pattern(qp, kp)
        if self.causal and self.tq > 1:  # a single query is the last key: every key is at or before it
            m = m & (kj <= qi + (self.tk - self.tq))
        if self.q_doc is not None:
            m = m & (_gather(self.q_doc, qi) == _gather(self.k_doc, kj))
        if self.window is not None:
            near = qp - kp < self.window
            m = m & (near if self.k_mark is None else near | _gather(self.k_mark, kj))
        return m

    def dense(self, device=None) -> torch.Tensor:
        """(batch, Tq, Tk) bool; for references and single-token decode steps only."""
        qi = torch.arange(self.tq, device=device).view(1, -1, 1)
        kj = torch.arange(self.tk, device=device).view(1, 1, -1)
        return torch.broadcast_to(self(qi, kj), (self.batch, self.tq, self.tk))

    def mask_mod(self, device):
        """FlexAttention's mask_mod(b, h, q_idx, kv_idx). Int offsets become captured device
        tensors so that one compiled kernel serves every chunked-prefill offset."""
        q_off = torch.tensor(self.q_pos, device=device) if isinstance(self.q_pos, int) else None
        k_off = torch.tensor(self.k_pos, device=device) if isinstance(self.k_pos, int) else None
        shift = self.tk - self.tq

        def mod(b, h, q_idx, kv_idx):
            qp = q_idx + q_off if q_off is not None else _pick(self.q_pos, b, q_idx)
            kp = kv_idx + k_off if k_off is not None else _pick(self.k_pos, b, kv_idx)
            m = self.pattern(qp, kp)
            if self.causal:
                m = m & (kv_idx <= q_idx + shift)
            if self.q_doc is not None:
                m = m & (_pick(self.q_doc, b, q_idx) == _pick(self.k_doc, b, kv_idx))
            if self.window is not None:
                near = qp - kp < self.window
                m = m & (near if self.k_mark is None else near | _pick(self.k_mark, b, kv_idx))
            return m

        return mod
