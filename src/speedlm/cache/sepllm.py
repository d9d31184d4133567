"""SepLLM's KV policy (Chen et al. 2024, arXiv:2412.12094): keep the first `initial` tokens,
the separator tokens and a local window.

Two settings:

- training-free / from scratch (`cap=None`): every separator is kept, keys keep their original
  positions, and decoding equals the full forward under the SepLLM mask: a query sees the
  initial tokens, every separator before it and the last `window` tokens (itself included).
  Tokens leaving the window are evicted in batches (`stale_slots`), not one copy per token.
- streaming (`cap`, `separator_cache`, `shift_positions=True`): the cache grows up to `cap`
  slots, every cached key visible (a call's own tokens causally: feed chunks no longer than
  the window); past the cap it compresses: of the slots outside the
  initial tokens and the last window - 1, only separators stay, and only the newest
  `separator_cache` of them (FIFO). Keys are stored before RoPE and rotated by their slot, so
  positions stay below the cap for streams of any length. After a compression the cache holds
  at most initial + separator_cache + window - 1 slots, never more than cap.

A batch shares one selection of slots (the union of what each row keeps). Without a cap every
row still sees exactly its own separators through its marks (the window and the marks mask the
rest), so a batch decodes as its rows would alone. Under a cap every cached key is visible and
each key is rotated by its slot, so a shared selection would show a row the other rows'
separators at positions it would not have alone: the streaming cache refuses to compress a batch
of more than one row (until it first reaches the cap, a batch is exact).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from speedlm.cache.kv import KVPolicy, token_positions
from speedlm.errors import SpeedlmError

# Fraction of tokens that are separators in the default corpus (Python stdlib source, byte
# tokenizer: 35.4% of the validation split; spaces dominate); only for `retained`'s estimate of an unbounded cache,
# since which tokens are separators is data. Measured by tests/cache/test_sepllm_policy.py.
TYPICAL_SEPARATOR_RATE = 0.35


@dataclass(frozen=True)
class SepLLMPolicy(KVPolicy):
    separators: tuple[int, ...]
    initial: int = 4
    window: int = 256
    separator_cache: int | None = None
    cap: int | None = None
    shift_positions: bool = False
    marks_keys: ClassVar[bool] = True

    def __post_init__(self):
        object.__setattr__(self, "separators", tuple(sorted({int(i) for i in self.separators})))
        if not self.separators:
            raise SpeedlmError("SepLLM needs at least one separator id")
        if self.initial < 0 or self.window < 1:
            raise SpeedlmError(f"SepLLM needs initial >= 0 and window >= 1, got initial={self.initial}, window={self.window}")
        if (self.cap is None) != (self.separator_cache is None):
            raise SpeedlmError("SepLLM streaming takes both a cap and a separator cache size (or neither)")
        if self.cap is not None:
            least = self.initial + self.separator_cache + self.window
            if self.separator_cache < 0 or self.cap < least:
                raise SpeedlmError(
                    f"SepLLM's cap must be at least initial + separator cache + window = {least}, got cap={self.cap}"
                )

    @property
    def pre_rope(self) -> bool:
        return self.shift_positions

    @property
    def bounded(self) -> bool:
        return self.cap is not None

    def attend_window(self):
        # streaming: a call sees every cached key and its own tokens causally (the cap bounds
        # them); chunks no longer than the window are then exactly SepLLM's streaming rule
        return self.window if self.cap is None else None

    def mark(self, token_ids, positions, t, device):
        if token_ids is None:
            raise SpeedlmError("SepLLM attention needs the token ids (SeqMeta.token_ids) to find the separators")
        ids = torch.tensor(self.separators, device=token_ids.device, dtype=token_ids.dtype)
        return torch.isin(token_ids, ids) | (token_positions(positions, t, token_ids.device) < self.initial)

    def keep(self, length, positions, marks=None):
        slot = torch.arange(length, device=marks.device)
        recent = slot >= length - (self.window - 1)
        if self.cap is None:
            kept = marks.any(0) | recent
            if length - int(kept.sum()) <= self.stale_slots():
                # evicting one token per step would copy the whole cache per token; stale slots
                # are invisible anyway (unmarked and out of the window), so compact in batches
                return slice(0, length)
        else:
            if length <= self.cap:
                return slice(0, length)
            if marks.shape[0] > 1:
                raise SpeedlmError(
                    "the streaming SepLLM cache (a cap) keeps one set of slots for the whole batch, so rows would see "
                    "each other's separators once it compresses; stream one row at a time (batch size 1)"
                )
            initial = (token_positions(positions, length, marks.device) < self.initial).any(0)
            older_separators = (marks.any(0) & ~initial & ~recent).nonzero()[:, 0]
            newest = older_separators[max(0, older_separators.numel() - self.separator_cache) :]
            kept = initial | recent
            kept[newest] = True
        if bool(kept.all()):
            return slice(0, length)
        return kept.nonzero()[:, 0]

    def stale_slots(self) -> int:
        """Slots the training-free cache may hold past what its queries see before it compacts:
        amortised O(1) copies per token, at most this many extra entries."""
        return max(64, self.window)

    def retained(self, context_len):
        if self.cap is not None:
            return min(context_len, self.cap)
        local = self.initial + self.window - 1
        if context_len <= local:
            return context_len
        return local + round(TYPICAL_SEPARATOR_RATE * (context_len - local))
