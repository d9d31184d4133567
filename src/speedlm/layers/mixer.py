"""The token-mixer contract every architecture implements.

A mixer maps x (B, T, D) -> y (B, T, D). One `forward` serves training (cache=None), prefill
(empty cache, T > 1), chunked prefill (non-empty cache, T > 1) and decoding (T == 1); the cache
is updated in place. Sequence metadata travels in `SeqMeta`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from speedlm.cache.base import LayerCache


@dataclass(frozen=True)
class SeqMeta:
    """start: absolute position of x[:, 0] (== tokens already in the cache).
    causal: False only for bidirectional (e.g. diffusion) models.
    token_ids: (B, T) ids for mixers that look at tokens (e.g. separator detection)."""

    start: int = 0
    causal: bool = True
    token_ids: torch.Tensor | None = None


class Mixer(nn.Module):
    """Base class. Subclasses set the capability flags and implement the methods below."""

    supports_causal: ClassVar[bool] = True
    supports_bidirectional: ClassVar[bool] = False
    supports_decoding: ClassVar[bool] = True

    def forward(self, x: torch.Tensor, meta: SeqMeta, cache: LayerCache | None = None) -> torch.Tensor:
        raise NotImplementedError

    def reference(self, x: torch.Tensor, meta: SeqMeta) -> torch.Tensor:
        """The same function through the naive op (dense mask / loop over time), no cache."""
        raise NotImplementedError

    def init_cache(self) -> LayerCache:
        raise NotImplementedError

    def state_bytes(self, context_len: int, batch_size: int = 1, bytes_per_elem: int = 2) -> int:
        """Inference state held after `context_len` tokens (KV entries or recurrent state)."""
        raise NotImplementedError

    def flops_per_token(self, context_len: int) -> float:
        """Forward FLOPs per token (2 per multiply-add), averaged over a sequence of context_len."""
        raise NotImplementedError


def linear_flops(*modules: nn.Linear) -> float:
    """Forward FLOPs per token of a chain of Linear layers."""
    return float(sum(2 * m.in_features * m.out_features for m in modules))
