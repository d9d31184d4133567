"""KV eviction by attention scores: heavy hitters (H2O, Zhang et al. 2023, arXiv:2306.14048) and
SnapKV (Li et al. 2024, arXiv:2404.14469). Both keep a budget of slots per KV head, chosen by how
much attention the keys received, so each head keeps its own keys: the cache stores (B, Hkv, L,
Dh) with per-head slots, not the shared slots of `KVCache`.

They need the attention weights of the keys they keep, which the fused kernels do not return:
a layer under these policies attends through `attend_with_weights` (the scores written out,
softmax, weighted sum), O(Tq x L) memory per call. In decoding (Tq = 1) that is the fused
kernel's work in three products; a prefill of T tokens into an empty cache builds its (T, T)
weights once, which is what H2O and SnapKV read from a prompt.

- H2O: every key accumulates the attention it receives from every query (summed over the
  query heads of its KV group); after each call the cache keeps the `recent` newest slots and the
  `heavy` others with the largest sums (budget heavy + recent).
- SnapKV: the last `observe` queries vote: their attention to the older keys, summed over them
  and the group's heads and smoothed by average pooling over `kernel` neighbouring keys. The
  paper compresses a prompt once; streamed, the cache is compressed each time it reaches
  budget + observe slots, back to `budget` (the observation window's own keys plus the best
  budget - observe older ones), so it holds between budget and budget + observe - 1 slots.

Keys are cached after RoPE at their original positions (as the window policy), so a query's
attention over the kept keys is exactly full attention restricted to them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from speedlm.cache.base import LayerCache
from speedlm.cache.kv import KVPolicy
from speedlm.errors import SpeedlmError
from speedlm.ops.attention import repeat_kv


@dataclass(frozen=True)
class ScoredPolicy(KVPolicy):
    """Base of the score-driven policies: a cache of their own, and the weights of every call."""

    bounded: ClassVar[bool] = True
    needs_weights: ClassVar[bool] = True
    emulated_by_mask: ClassVar[bool] = False
    accumulates: ClassVar[bool] = False  # keeps each slot's summed attention (H2O)
    observed: ClassVar[int] = 0  # how many of the latest queries it keeps (SnapKV's window)

    def make_cache(self, rotate=None) -> ScoredKVCache:
        return ScoredKVCache(self)

    def keep(self, length, positions, marks=None):  # the slots follow scores, not positions
        raise SpeedlmError(f"{type(self).__name__} chooses slots from attention scores (ScoredKVCache)")

    def keys_seen(self, token_ids: torch.Tensor) -> torch.Tensor:
        # what a token-by-token pass attends to: every key until the cache is full, then its budget
        b, t = token_ids.shape
        idx = torch.arange(t, device=token_ids.device).expand(b, t)
        return torch.clamp(idx + 1, max=self.most_slots() + 1)

    def most_slots(self) -> int:
        raise NotImplementedError


@dataclass(frozen=True)
class H2OPolicy(ScoredPolicy):
    heavy: int = 64
    recent: int = 64
    accumulates: ClassVar[bool] = True

    def __post_init__(self):
        if self.heavy < 0 or self.recent < 1:
            raise SpeedlmError(f"h2o: heavy={self.heavy} must be >= 0 and recent={self.recent} >= 1")

    def retained(self, context_len: int) -> int:
        return min(context_len, self.heavy + self.recent)

    def most_slots(self) -> int:
        return self.heavy + self.recent

    def evict(self, cache: ScoredKVCache) -> torch.Tensor | None:
        n = cache.length
        budget = self.heavy + self.recent
        if n <= budget:
            return None
        older = cache.score[..., : n - self.recent]  # (B, Hkv, n - recent)
        heavy = older.topk(self.heavy, dim=-1).indices.sort(dim=-1).values
        recent = torch.arange(n - self.recent, n, device=older.device).expand(*older.shape[:2], self.recent)
        return torch.cat([heavy, recent], dim=-1)


@dataclass(frozen=True)
class SnapKVPolicy(ScoredPolicy):
    budget: int = 128
    observe: int = 32
    kernel: int = 7

    @property
    def observed(self) -> int:
        return self.observe

    def __post_init__(self):
        if self.observe < 1 or self.budget <= self.observe:
            raise SpeedlmError(f"snapkv: the budget ({self.budget}) must exceed the observation window "
                               f"({self.observe} >= 1)")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise SpeedlmError(f"snapkv: the pooling kernel ({self.kernel}) must be odd and positive")

    def retained(self, context_len: int) -> int:
        return min(context_len, self.budget + self.observe - 1)

    def most_slots(self) -> int:
        return self.budget + self.observe - 1

    def evict(self, cache: ScoredKVCache) -> torch.Tensor | None:
        n = cache.length
        if n < self.budget + self.observe:
            return None
        w = self.observe
        q = cache.queries  # (B, H, w, Dh): the observation window's queries
        k = repeat_kv(cache.k, q.shape[1] // cache.k.shape[1])
        logits = (q @ k.transpose(-1, -2)) * cache.scale  # (B, H, w, n)
        causal = torch.arange(n, device=q.device) <= torch.arange(n - w, n, device=q.device)[:, None]
        weights = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)[..., : n - w]
        votes = weights.sum(2).unflatten(1, (cache.k.shape[1], -1)).sum(2)  # (B, Hkv, n - w)
        votes = F.avg_pool1d(votes.flatten(0, 1)[:, None], self.kernel, 1, self.kernel // 2,
                             count_include_pad=False)[:, 0].view_as(votes)
        keep = votes.topk(self.budget - w, dim=-1).indices.sort(dim=-1).values
        window = torch.arange(n - w, n, device=q.device).expand(*keep.shape[:2], w)
        return torch.cat([keep, window], dim=-1)


class ScoredKVCache(LayerCache):
    """Keys and values with per-head slots (B, Hkv, L, Dh), each slot's accumulated attention
    (B, Hkv, L) and the last queries a policy reads (SnapKV's observation window)."""

    def __init__(self, policy: ScoredPolicy):
        self.policy = policy
        self.k = self.v = self.score = self.queries = None
        self.scale = 1.0

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def tensors(self) -> list[torch.Tensor]:
        # the summed attention (H2O) and the latest queries (SnapKV) are state the policy reads
        # later, so they count in `nbytes` beside the keys and values
        return [t for t in (self.k, self.v, self.score, self.queries) if t is not None]

    def kv_slots(self) -> list[float]:
        return [self.length]

    def detach(self) -> None:
        for name in ("k", "v", "score", "queries"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.detach())

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """The new queries over the kept keys and their own (causally); then the policy's
        eviction. q (B, H, T, Dh), k, v (B, Hkv, T, Dh); returns (B, H, T, Dh)."""
        k_all, v_all = self.append(k, v)
        out, weights = attend_with_weights(q, k_all, v_all, scale)
        self.observe(q, weights, scale)
        return out

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the new keys and values; return every key and value the new queries read."""
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v

    def observe(self, q: torch.Tensor, weights: torch.Tensor, scale: float) -> None:
        """The call's queries and their attention weights over every held key (B, H, T, L): what
        the policy reads is kept (summed attention, the latest queries), then it evicts."""
        self.scale = scale
        if self.policy.accumulates:
            received = weights.sum(2).unflatten(1, (self.k.shape[1], -1)).sum(2)  # (B, Hkv, L)
            old = 0 if self.score is None else self.score.shape[2]
            self.score = received if self.score is None else received + F.pad(self.score, (0, received.shape[2] - old))
        n = self.policy.observed
        if n:
            self.queries = (q if self.queries is None else torch.cat([self.queries, q], dim=2))[:, :, -n:]
        keep = self.policy.evict(self)
        if keep is not None:
            index = keep[..., None]
            self.k = self.k.gather(2, index.expand(-1, -1, -1, self.k.shape[-1]))
            self.v = self.v.gather(2, index.expand(-1, -1, -1, self.v.shape[-1]))
            if self.score is not None:
                self.score = self.score.gather(2, keep)


def attend_with_weights(q, k, v, scale):
    """Softmax attention of the last Tq of the Tk keys' queries, returning (out, weights
    (B, H, Tq, Tk)); the new queries see every cached key and their own causally."""
    groups = q.shape[1] // k.shape[1]
    kr, vr = repeat_kv(k, groups), repeat_kv(v, groups)
    tq, tk = q.shape[2], k.shape[2]
    logits = (q @ kr.transpose(-1, -2)) * scale
    if tq > 1:
        causal = torch.arange(tk, device=q.device) <= torch.arange(tk - tq, tk, device=q.device)[:, None]
        logits = logits.masked_fill(~causal, float("-inf"))
    weights = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1).to(q.dtype)
    return weights @ vr, weights
