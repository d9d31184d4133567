"""The trainer's stateful segment mode (`--segments K`, DESIGN.md "Segment memory"):
micro-batches come in groups of K consecutive windows of the same streams, and the model's
own cache (the one decoding uses) carries each row's state from one window to the next,
detached in between: the next segment reads the previous one's memory (Transformer-XL's
keys and values, a recurrent model's state) but does not backpropagate into it.

Any model whose layers decode can train this way; a cache that grows without bound (full
attention) must hold K x seq_len tokens within the model's context. A run resumed at a group boundary reproduces the uninterrupted run exactly.
Resumed in the middle of a group, it first replays that group's earlier segments without
gradients to rebuild the memory, with the checkpoint's weights rather than the older ones the
memory was first computed with: close, not identical, until the next group (a warning says so).
"""

from __future__ import annotations

import warnings

import torch

from speedlm.data.dataset import segment_batch
from speedlm.errors import SpeedlmError


def check_segment_model(model, segments: int, seq_len: int) -> None:
    if not hasattr(model, "init_cache") or not all(getattr(b, "supports_decoding", False) for b in model.blocks):
        raise SpeedlmError("segment mode carries the model's caches between segments; some layers of this model have none")
    limit = model.init_cache().max_context
    if limit is not None and segments * seq_len > limit:
        raise SpeedlmError(
            f"--segments {segments} x --seq-len {seq_len} = {segments * seq_len} tokens per stream is longer than this "
            f"model's caches allow ({limit}); use fewer segments or a model with bounded memory"
        )


class SegmentMemory:
    """Hands out segment-mode micro-batches with the cache that continues them."""

    def __init__(self, model, stream, segments: int, batch_size: int, seq_len: int, seed: int, prepare, autocast):
        self.model, self.stream, self.segments = model, stream, segments
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.prepare, self.autocast = prepare, autocast  # (x, y) -> this rank's rows on the device; autocast context
        self.cache, self.next_index = None, None

    def _segment(self, index: int):
        x, y, j = segment_batch(self.stream, index, self.batch_size, self.seq_len, self.segments, self.seed)
        x, y = self.prepare(x, y)
        return x, y, j

    def batch(self, index: int):
        """(x, y, cache) for micro-batch `index`."""
        x, y, j = self._segment(index)
        if j == 0:
            self.cache = self.model.init_cache()
        elif self.cache is None or self.next_index != index:  # resumed mid-group: rebuild its memory
            warnings.warn(
                f"resuming in the middle of a segment group (segment {j + 1} of {self.segments}): its memory is "
                "rebuilt with the current weights, so this group's losses differ slightly from the uninterrupted run's",
                stacklevel=2,
            )
            self.cache = self.model.init_cache()
            with torch.no_grad(), self.autocast():
                for i in range(index - j, index):
                    self.model(self._segment(i)[0], self.cache)
        else:
            self.cache.detach()
        self.next_index = index + 1
        return x, y, self.cache
