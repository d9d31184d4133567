"""Key/value caches and their retention policies.

A policy decides which slots stay after each update (`keep`), how many that is after n tokens
(`retained`, what `state_bytes` promises), what a call's queries may see (`attend_window`: a
local window, plus the keys it `mark`s, e.g. attention sinks and SepLLM's initial tokens and
separators, which the window never drops; `visible` is that rule as a mask on positions, for
references), and whether keys are stored before RoPE:

- `pre_rope = False` (full, window; SepLLM in its training-free setting): keys are rotated at
  their original positions before they are cached, so attention is exactly the masked full
  forward.
- `pre_rope = True` (SepLLM streaming): keys are cached unrotated and rotated by their slot in
  the cache when read, so positions never exceed the cache size however long the stream. The
  attention mixer asks the policy which one applies.
- `shift_head = True` (attention sinks): the same positions as rotation by slot (the sinks at
  slots 0..s-1, the window after them), reached without rotating every key on every token.
  RoPE sees only differences of positions, and the window's keys sit at their original
  distances from the query; so the cache keeps keys rotated at their original positions and
  only the sinks are re-rotated, to sit right before the window (the `rotate` the attention
  mixer gives the cache, applied to a copy of the sinks taken before they first moved): O(sinks)
  per token instead of O(cache).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch

from speedlm.cache.buffer import HeadAndTail, TokenBuffer, token_positions
from speedlm.errors import SpeedlmError


class KVPolicy:
    pre_rope: ClassVar[bool] = False
    shift_head: ClassVar[bool] = False  # the kept head is rotated to sit right before the window
    bounded: ClassVar[bool] = False  # the cache stops growing: generation has no length limit
    marks_keys: ClassVar[bool] = False  # `mark` returns per-key flags
    # ... that follow from the keys' positions alone (sinks): read back from positions, not stored
    marks_follow_positions: ClassVar[bool] = False
    # the next single query sees every slot this policy retains (and itself): decoding needs no mask
    next_query_sees_all: ClassVar[bool] = False
    # the attention weights of every call decide what stays (H2O, SnapKV: cache/scored.py)
    needs_weights: ClassVar[bool] = False
    # one masked call over a sequence computes what decoding it token by token would (`visible`);
    # False where the cache's content depends on the history (eviction by scores, quantisation)
    emulated_by_mask: ClassVar[bool] = True

    def make_cache(self, rotate=None):
        """The cache an attention layer keeps under this policy (`rotate`: its RoPE, for
        policies that move keys)."""
        return KVCache(self, rotate=rotate)

    def keep(self, length: int, positions: int | torch.Tensor, marks: torch.Tensor | None = None):
        """Slots to retain out of `length` (positions, and the stored marks (B, L) when the
        policy marks keys): a suffix slice, a `HeadAndTail` (the first slots and a suffix, which
        the buffer keeps without compacting), or slot indices (L',) / (B, L') on the device of
        the positions or marks, which is the cache's."""
        raise NotImplementedError

    def retained(self, context_len: int) -> int:
        """Slots held after `context_len` tokens."""
        raise NotImplementedError

    def attend_window(self) -> int | None:
        """The local window a call's queries attend within (None: every causal key); marked
        keys are seen beyond it."""
        return None

    def mark(self, token_ids: torch.Tensor | None, positions: int | torch.Tensor, t: int, device) -> torch.Tensor | None:
        """(B|1, T) bool for T new tokens: keys the window never drops (None: no marks)."""
        return None

    def keys_seen(self, token_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) how many keys each query of one call over these tokens (positions 0..T-1)
        attends to: the KV entries this policy needs at that point, against t + 1 for the full
        cache (what `speedlm eval --attention` reports as the KV ratio)."""
        b, t = token_ids.shape
        idx = torch.arange(t, device=token_ids.device).expand(b, t)
        w = self.attend_window()
        if w is None:
            return idx + 1
        marks = self.mark(token_ids, 0, t, token_ids.device)
        near = torch.clamp(idx + 1, max=w)
        if marks is None:
            return near
        # marked keys outside the window: those at index <= t - w
        before = torch.nn.functional.pad(marks.expand(b, t).long().cumsum(-1), (1, 0))
        return near + before.gather(1, torch.clamp(idx - w + 1, min=0))

    def visible(self, q_pos: torch.Tensor, k_pos: torch.Tensor, k_mark: torch.Tensor | None = None):
        """Which keys a decoding query sees under this policy (None: all), as the mask of the
        full forward this cache emulates (positions (B|1, Tq, 1) and (B|1, 1, Tk), marks
        (B|1, 1, Tk)); for references."""
        w = self.attend_window()
        if w is None:
            return None
        near = q_pos - k_pos < w
        return near if k_mark is None else near | k_mark


@dataclass(frozen=True)
class FullPolicy(KVPolicy):
    next_query_sees_all: ClassVar[bool] = True
    def keep(self, length, positions, marks=None):
        return slice(0, length)

    def retained(self, context_len):
        return context_len


def refuse_lossy(kv_policy: KVPolicy | None, mixer: str, why: str) -> None:
    """One line for a mixer whose cache must keep every key as it is (`why`), asked to run
    under a policy that drops keys or changes them (a window, sinks, scores, quantisation)."""
    if kv_policy is not None and (type(kv_policy) is not FullPolicy):
        raise SpeedlmError(f"{mixer} {why}; the {type(kv_policy).__name__} KV policy does not apply, use the full cache")


@dataclass(frozen=True)
class WindowPolicy(KVPolicy):
    """The last window - 1 keys: the next query sees itself plus window - 1 past keys."""

    window: int
    bounded: ClassVar[bool] = True
    next_query_sees_all: ClassVar[bool] = True

    def keep(self, length, positions, marks=None):
        return slice(length - self.retained(length), length)

    def retained(self, context_len):
        return min(context_len, self.window - 1)

    def attend_window(self):
        return self.window


@dataclass(frozen=True)
class SinkPolicy(KVPolicy):
    """Attention sinks (StreamingLLM, Xiao et al. 2023, arXiv:2309.17453): the first `sinks`
    tokens and the last window - 1, at positions within the cache (the sinks first, the window
    right after them), so positions stay below sinks + window however long the stream
    (`shift_head`: the module docstring says how)."""

    sinks: int = 4
    window: int = 1020
    shift_head: ClassVar[bool] = True
    next_query_sees_all: ClassVar[bool] = True  # the kept sinks, and the window
    bounded: ClassVar[bool] = True
    marks_keys: ClassVar[bool] = True
    marks_follow_positions: ClassVar[bool] = True

    def keep(self, length, positions, marks=None):
        if length <= self.retained(length):
            return slice(0, length)
        return HeadAndTail(self.sinks, length - (self.window - 1))

    def retained(self, context_len):
        return min(context_len, self.sinks + self.window - 1)

    def attend_window(self):
        return self.window

    def mark(self, token_ids, positions, t, device):
        return token_positions(positions, t, device) < self.sinks


@dataclass(frozen=True)
class PrefixWindowPolicy(KVPolicy):
    """The first `prefix` positions (Longformer's global tokens) and the last window - 1 keys, at
    their original positions (the mixer's pattern decides what each query sees)."""

    prefix: int
    window: int
    bounded: ClassVar[bool] = True

    def keep(self, length, positions, marks=None):
        if length <= self.retained(length):
            return slice(0, length)
        if isinstance(positions, int):  # contiguous: the prefix positions are the first slots
            return HeadAndTail(min(length, max(0, self.prefix - positions)), length - (self.window - 1))
        kept = (positions < self.prefix).any(0)
        kept[length - (self.window - 1) :] = True
        return kept.nonzero()[:, 0]

    def retained(self, context_len):
        return min(context_len, self.prefix + self.window - 1)


class Keys(NamedTuple):
    """What a call's queries may read: cached + new keys and values, their positions, and
    their marks (None unless the policy marks keys)."""

    k: torch.Tensor
    v: torch.Tensor
    positions: int | torch.Tensor
    marks: torch.Tensor | None


class KVCache(TokenBuffer):
    """Retained keys/values (B, Hkv, L, Dh) are `self.k`, `self.v`, with their positions (and
    per-slot marks (B, L) when the policy marks keys, stored beside them as a third entry).

    `rotate(keys (B, H, L, Dh), shift: int) -> every key rotated `shift` positions further` is the
    attention mixer's RoPE, which a `shift_head` policy needs to move its sinks."""

    def __init__(self, policy: KVPolicy = FullPolicy(), rotate=None):
        super().__init__(policy, n_entries=3 if policy.marks_keys and not policy.marks_follow_positions else 2)
        if policy.shift_head and rotate is None:
            raise SpeedlmError(f"{type(policy).__name__} moves its first keys: its cache needs the mixer's rotation")
        self._rotate = rotate
        self._sinks: torch.Tensor | None = None  # the head's keys at their own positions, before any move
        self._shift = 0  # slots dropped between the head and the window so far (each row's positions advance by one per slot)

    @property
    def k(self) -> torch.Tensor | None:
        e = self.entries()
        return e[0] if e else None

    @property
    def v(self) -> torch.Tensor | None:
        e = self.entries()
        return e[1] if e else None

    @property
    def stores_marks(self) -> bool:
        """Whether `extend` needs the new keys' marks (SepLLM's separators, from token ids)."""
        return self.n_entries == 3

    def marks(self) -> torch.Tensor | None:
        """The stored marks (B, L) of the retained slots (None where the policy stores none)."""
        if self.n_entries != 3:
            return None
        e = self.entries()
        return e[2][..., 0] if e else None

    def mask_terms(self, keys: Keys, positions: int | torch.Tensor, t: int, window: int | None):
        """(query positions, key positions, key marks) for the mask of a call of `t` tokens at
        `positions` that read `keys`. Where the policy shifts positions into the cache (sinks:
        the sinks first, the window right after them; streaming SepLLM), a slot is a position:
        int offsets, the sinks marked by slot. Otherwise the original positions and the stored
        marks. Marks only matter beyond a window (None without one)."""
        b, n = keys.k.shape[0], keys.k.shape[-2]
        if self.policy.shift_head:
            return n - t, 0, None if window is None else self.policy.mark(None, 0, n, keys.k.device).expand(b, n)
        if self.policy.pre_rope:
            return n - t, 0, None if window is None else keys.marks
        return positions, keys.positions, None if window is None else keys.marks

    def tensors(self) -> list[torch.Tensor]:
        return self.entries()[:2]  # marks are index metadata, like positions

    def kv_slots(self) -> list[float]:
        return [self.length]

    def extend(self, k, v, positions: int | torch.Tensor = None, marks: torch.Tensor | None = None) -> Keys:
        """Append keys/values of the new tokens at `positions` (default: right after the
        retained ones), with their marks (B|1, T) when the policy marks keys; return what the
        new queries may read (cache + new). Then retain only what the policy keeps."""
        if self.n_entries == 3:
            if marks is None:
                raise SpeedlmError(f"{type(self.policy).__name__} stores marks: extend its cache with the new keys' marks")
            out, pos = super().extend(k, v, marks.expand(k.shape[0], -1)[..., None], positions=positions)
            return Keys(out[0], out[1], pos, out[2][..., 0])
        (k_all, v_all), pos = super().extend(k, v, positions=positions)
        return Keys(k_all, v_all, pos, None)

    def _keep(self, positions):
        return self.policy.keep(self.length, positions, self.marks())

    # ----- shift_head: the sinks re-rotated to sit right before the window -----
    def _retain(self, keep) -> None:
        moves_head = self.policy.shift_head and isinstance(keep, HeadAndTail) and 0 < keep.head < keep.tail
        if moves_head and self._sinks is None:  # the first eviction: the head is still where it was written
            self._sinks = self._bufs[0].narrow(-2, self._begin, keep.head).clone()
        super()._retain(keep)
        if moves_head and self._drop == 0:  # compacted at once (under autograd): re-rotate now, out of place
            self._shift += keep.tail - keep.head
            k = self._bufs[0]
            self._bufs[0] = torch.cat([self._rotate(self._sinks, self._shift), k[..., keep.head :, :]], dim=-2)

    def _moved_with_head(self) -> list[torch.Tensor]:
        # the keys' head is written afresh, rotated, after the move
        return self._bufs[1:] if self.policy.shift_head else self._bufs

    def _settle(self) -> None:
        drop = self._drop if self.policy.shift_head else 0
        super()._settle()
        if drop:
            # the slots between the sinks and the window are gone: every sink sits `_shift` positions later
            self._shift += drop
            self._bufs[0].narrow(-2, self._begin, self._sinks.shape[-2]).copy_(self._rotate(self._sinks, self._shift))
