"""Activation checkpointing, applied from outside the model: each block's forward runs under
`torch.utils.checkpoint` (non-reentrant), so its activations are recomputed in the backward
pass instead of stored; memory for time. Only the forward is wrapped: parameters, the state
dict and the checkpoints are unchanged, and calls with a cache or without gradients (decoding,
validation) run as before."""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def checkpoint_blocks(model) -> None:
    for block in model.blocks:
        inner = block.forward

        def run(x, meta, cache=None, _inner=inner):
            if cache is not None or not torch.is_grad_enabled():
                return _inner(x, meta, cache)
            return checkpoint(_inner, x, meta, None, use_reentrant=False)

        block.forward = run
