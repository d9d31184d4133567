"""Cutting the time axis into chunks, shared by every chunked op.

The loops that carry a state from chunk to chunk take their per-chunk tensors with `unbind`,
never by indexing (`x[:, :, i]`): autograd turns each indexed slice's gradient into a zero
tensor the size of the whole `x`, so N chunks cost O(N^2) memory traffic in the backward
(forward + backward of the delta rule at T = 4096, C = 16: 2.1 s instead of 0.25 s); unbind's backward stacks the
N slice gradients once."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def num_chunks(t: int, chunk_size: int) -> tuple[int, int]:
    """(chunk length C, number of chunks N) for T tokens: C = min(chunk_size, T), N = ceil(T / C)."""
    c = max(1, min(chunk_size, t))
    return c, -(-t // c)


def to_chunks(x: torch.Tensor, n: int, c: int, value: float = 0.0) -> torch.Tensor:
    """(B, H, T, D) -> (B, H, N, C, D), padding the time axis to N * C with `value` (no copy when
    T already is N * C)."""
    b, h, t, d = x.shape
    if n * c != t:
        x = F.pad(x, (0, 0, 0, n * c - t), value=value)
    return x.reshape(b, h, n, c, d)


def in_segments(fn, tensors: list[torch.Tensor], segment: int, state, dim: int = 1):
    """Run a state-carrying op over consecutive time segments of at most `segment` steps:
    `fn(*pieces, state) -> (out, state)` on each segment's pieces of `tensors` (split along `dim`),
    the outputs concatenated. A chunked op whose per-step working set grows with T (all chunks
    advance together) keeps it at one segment's size this way, so its time stays linear in T
    once a segment outgrows the CPU caches; the result is the same (state chaining)."""
    outs = []
    for pieces in zip(*(torch.split(x, segment, dim=dim) for x in tensors)):  # split, not indexing
        out, state = fn(*pieces, state)
        outs.append(out)
    return torch.cat(outs, dim=dim), state


def band_windows(z: torch.Tensor, before: int, size: int, step: int, blocks: int, fill) -> torch.Tensor:
    """z (..., N, E): for block b, the rows [b * step - before, b * step - before + size) (out of
    range rows: `fill`) -> (..., blocks, size, E), as views of one padded copy."""
    need = (blocks - 1) * step + size
    after = max(0, need - before - z.shape[-2])
    pad = [z.new_full((*z.shape[:-2], before, z.shape[-1]), fill), z, z.new_full((*z.shape[:-2], after, z.shape[-1]), fill)]
    return torch.cat(pad, dim=-2).unfold(-2, size, step).transpose(-1, -2)
