"""Key/value cache with a retention policy.

The policy decides how many trailing entries stay after each update: all of them (full
attention) or window - 1 (sliding window: the next query sees itself plus window - 1 past
keys), so a window model's cache is O(window) however long it generates.

Storage: for inference the entries live in a preallocated buffer that new keys are written
into, so a decoded token costs O(1) copies instead of re-concatenating the whole history.
When the buffer runs out it is reallocated at twice what is retained (amortised O(1) per
token; for a window, capacity stays about 2 x window). Under autograd the cache concatenates
instead, because in-place writes would invalidate tensors saved for the backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from speedlm.cache.base import LayerCache

_MIN_CAPACITY = 64


@dataclass(frozen=True)
class FullPolicy:
    def keep(self, length: int) -> int:
        return length


@dataclass(frozen=True)
class WindowPolicy:
    window: int

    def keep(self, length: int) -> int:
        return min(length, self.window - 1)


class KVCache(LayerCache):
    """Retained keys/values (B, Hkv, L, Dh) are `self.k`, `self.v`: always the latest L positions."""

    def __init__(self, policy=FullPolicy()):
        self.policy = policy
        self._k_buf: torch.Tensor | None = None
        self._v_buf: torch.Tensor | None = None
        self._start = 0  # retained entries are buffer[:, :, start:end]
        self._end = 0
        self.reallocations = 0

    @property
    def length(self) -> int:
        return self._end - self._start

    @property
    def k(self) -> torch.Tensor | None:
        return None if self._k_buf is None else self._k_buf[:, :, self._start : self._end]

    @property
    def v(self) -> torch.Tensor | None:
        return None if self._v_buf is None else self._v_buf[:, :, self._start : self._end]

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new keys/values; return everything the new queries may need (cache + new),
        then retain only what the policy keeps for later calls."""
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            k_all, v_all = self._concat(k, v)
        else:
            k_all, v_all = self._append(k, v)
        keep = self.policy.keep(self._end - self._start)
        self._start = self._end - keep
        self._shrink_if_oversized()
        return k_all, v_all

    def _concat(self, k, v):
        if self.length:
            k, v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        self._k_buf, self._v_buf, self._start, self._end = k, v, 0, k.shape[2]
        return k, v

    def _append(self, k, v):
        t = k.shape[2]
        if self._k_buf is None or self._end + t > self._k_buf.shape[2] or self._k_buf.requires_grad:
            self._reallocate(k, v, needed=self.length + t)
        self._k_buf[:, :, self._end : self._end + t] = k
        self._v_buf[:, :, self._end : self._end + t] = v
        self._end += t
        return self.k, self.v

    def _reallocate(self, k, v, needed: int) -> None:
        # a fresh buffer rather than an in-place shift: views handed out earlier stay valid
        capacity = max(_MIN_CAPACITY, 2 * needed)
        shape = (k.shape[0], k.shape[1], capacity, k.shape[3])
        k_buf, v_buf = k.new_empty(shape), v.new_empty(shape)
        n = self.length
        if n:
            k_buf[:, :, :n] = self.k
            v_buf[:, :, :n] = self.v
        self._k_buf, self._v_buf, self._start, self._end = k_buf, v_buf, 0, n
        self.reallocations += 1

    def _shrink_if_oversized(self) -> None:
        # after a long prefill into a window cache, give back what the policy will never use
        if self._k_buf is None or self._k_buf.requires_grad:
            return
        if self._k_buf.shape[2] > max(_MIN_CAPACITY, 4 * (self.length + 1)):
            self._reallocate(self._k_buf, self._v_buf, needed=self.length + 1)

    def allocated_bytes(self) -> int:
        """Bytes reserved by the buffers (at most ~2x the retained entries, or 64 rows)."""
        bufs = [b for b in (self._k_buf, self._v_buf) if b is not None]
        return sum(b.numel() * b.element_size() for b in bufs)

    def tensors(self) -> list[torch.Tensor]:
        return [] if self._k_buf is None else [self.k, self.v]
