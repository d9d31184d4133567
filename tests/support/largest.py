"""The largest tensor an operation produces while a function runs: how a test shows that a
sparse method never builds a (T, T) matrix (a mask, a score table), whatever its plan."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _Largest(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def largest_tensor(fn) -> int:
    """Elements of the largest tensor any operation inside fn() returns."""
    with _Largest() as mode:
        fn()
    return mode.numel
