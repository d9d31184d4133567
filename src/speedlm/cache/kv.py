"""Key/value caches and their retention policies.

A policy decides which slots stay after each update (`keep`), how many that is after n tokens
(`retained`, what `state_bytes` promises), which keys a query of the full forward would see if
it were run with this cache (`visible`, the mask a lossy policy emulates), and whether keys are
stored before RoPE:

- `pre_rope = False` (full, window; SepLLM in its training-free setting): keys are rotated at
  their original positions before they are cached, so attention is exactly the masked full
  forward.
- `pre_rope = True` (attention sinks, SepLLM streaming): keys are cached unrotated and rotated
  by their slot in the cache when read, so positions never exceed the cache size however long
  the stream. The attention mixer asks the policy which one applies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from speedlm.cache.buffer import TokenBuffer
from speedlm.errors import SpeedlmError


class KVPolicy:
    pre_rope: ClassVar[bool] = False
    bounded: ClassVar[bool] = False  # the cache stops growing: generation has no length limit

    def keep(self, length: int, positions: int | torch.Tensor) -> slice | torch.Tensor:
        """Slots to retain out of `length`: a suffix slice, or slot indices (L',) / (B, L')."""
        raise NotImplementedError

    def retained(self, context_len: int) -> int:
        """Slots held after `context_len` tokens."""
        raise NotImplementedError

    def visible(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor | None:
        """Which keys a decoding query sees under this policy (None: all), as the mask of the
        full forward this cache emulates; for the lossy-policy contract tests."""
        return None


@dataclass(frozen=True)
class FullPolicy(KVPolicy):
    def keep(self, length, positions):
        return slice(0, length)

    def retained(self, context_len):
        return context_len


@dataclass(frozen=True)
class WindowPolicy(KVPolicy):
    """The last window - 1 keys: the next query sees itself plus window - 1 past keys."""

    window: int
    bounded: ClassVar[bool] = True

    def keep(self, length, positions):
        return slice(length - self.retained(length), length)

    def retained(self, context_len):
        return min(context_len, self.window - 1)

    def visible(self, q_pos, k_pos):
        return q_pos - k_pos < self.window


@dataclass(frozen=True)
class SinkPolicy(KVPolicy):
    """Attention sinks (StreamingLLM, Xiao et al. 2023, arXiv:2309.17453): the first `sinks`
    tokens and the last window - 1, keys stored before RoPE and rotated by their slot in the
    cache, so positions stay below sinks + window however long the stream."""

    sinks: int = 4
    window: int = 1020
    pre_rope: ClassVar[bool] = True
    bounded: ClassVar[bool] = True

    def keep(self, length, positions):
        if length <= self.retained(length):
            return slice(0, length)
        recent = torch.arange(length - (self.window - 1), length)
        return torch.cat([torch.arange(self.sinks), recent])

    def retained(self, context_len):
        return min(context_len, self.sinks + self.window - 1)

    def visible(self, q_pos, k_pos):
        return (k_pos < self.sinks) | (q_pos - k_pos < self.window)


POLICIES = ("full", "window", "sink")


def make_policy(name: str, window: int = 1024, sinks: int = 4) -> KVPolicy | None:
    """A KV policy by name for inference on any attention model: "full" (None: each mixer's
    own), "window" (the last `window` - 1 keys, original positions), "sink" (`sinks` initial
    tokens + the window, shifted positions)."""
    if name not in POLICIES:
        raise SpeedlmError(f"unknown attention policy {name!r}; choose one of {', '.join(POLICIES)}")
    if window < 2 or sinks < 0:
        raise SpeedlmError(f"the window must be >= 2 and sinks >= 0, got window={window}, sinks={sinks}")
    if name == "full":
        return None
    return WindowPolicy(window) if name == "window" else SinkPolicy(sinks, window)


class KVCache(TokenBuffer):
    """Retained keys/values (B, Hkv, L, Dh) are `self.k`, `self.v`, with their positions."""

    def __init__(self, policy: KVPolicy = FullPolicy()):
        super().__init__(policy, n_entries=2)

    @property
    def k(self) -> torch.Tensor | None:
        e = self.entries()
        return e[0] if e else None

    @property
    def v(self) -> torch.Tensor | None:
        e = self.entries()
        return e[1] if e else None

    def extend(self, k: torch.Tensor, v: torch.Tensor, positions: int | torch.Tensor = None):
        """Append keys/values of the new tokens at `positions` (default: right after the
        retained ones); return (k_all, v_all, key positions): everything the new queries may
        need (cache + new). Then retain only what the policy keeps for later calls."""
        (k_all, v_all), pos = super().extend(k, v, positions=positions)
        return k_all, v_all, pos
