"""Longformer's attention pattern (Beltagy et al. 2020, arXiv:2004.05150): a local band of
`window` plus global tokens. Every query sees the global keys; the global queries' own rows (which
see every key) are computed apart, with their own projections (layers/longformer.py), so the
pattern here is the band plus the global key columns. Global tokens are a set of positions:
in a causal model only a prefix (0 .. g - 1) can be global, because a global query sees every
key and in causal mode that is only the keys before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LongformerLocal:
    window: int
    global_positions: tuple[int, ...] = (0,)

    def is_global(self, pos: torch.Tensor) -> torch.Tensor:
        if not self.global_positions:
            return torch.zeros_like(pos, dtype=torch.bool)
        return torch.isin(pos, torch.tensor(self.global_positions, device=pos.device, dtype=pos.dtype))

    def __call__(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        return ((q_pos - k_pos).abs() < self.window) | self.is_global(k_pos)

    def plan(self, q, k, v, mask, scale=None, backend: str = "auto"):
        """Causal: the band plus the global key columns is a local window plus marked keys,
        which ops/marked_attention.py runs in one softmax per query block over the window span
        and the compacted global keys. Bidirectional: the generic sparse path."""
        from dataclasses import replace

        from speedlm.ops.marked_attention import marked_window_attention
        from speedlm.ops.masks import Full
        from speedlm.ops.sparse_attention import sparse_attention

        if not mask.causal:
            return sparse_attention(q, k, v, mask, scale, backend)
        k_pos = torch.arange(mask.k_pos, mask.k_pos + mask.tk, device=q.device)[None]
        marked = replace(mask, pattern=Full(), window=self.window, k_mark=self.is_global(k_pos))
        return marked_window_attention(q, k, v, marked, scale)


@dataclass(frozen=True)
class UpToPosition:
    """Keys at or before the query's position: causality by position, for a subset of queries
    (the global rows), which are not the last keys of the call."""

    def __call__(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        return k_pos <= q_pos
