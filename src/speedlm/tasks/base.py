"""The task contract: `load_task(name)` -> `TaskData` with a deterministic train/test split."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from speedlm.errors import SpeedlmError


@dataclass(frozen=True)
class TaskData:
    name: str
    description: str
    x_train: torch.Tensor  # (N, T, F) float32: T tokens (patches, frames) of F features
    y_train: torch.Tensor  # (N,) long
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def tokens(self) -> int:
        return self.x_train.shape[1]

    @property
    def features(self) -> int:
        return self.x_train.shape[2]


def split(n: int, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic (train, test) example indices: a seeded permutation, the first
    `test_fraction` of it held out."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = round(n * test_fraction)
    return order[n_test:].sort().values, order[:n_test].sort().values


def _digits(**kw) -> TaskData:
    from speedlm.tasks.digits import load_digits_task

    return load_digits_task(**kw)


def _spoken_digits(**kw) -> TaskData:
    from speedlm.tasks.spoken_digits import load_spoken_digits_task

    return load_spoken_digits_task(**kw)


TASKS: dict[str, Callable[..., TaskData]] = {"digits": _digits, "spoken-digits": _spoken_digits}


def load_task(name: str, **kw) -> TaskData:
    if name not in TASKS:
        raise SpeedlmError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name](**kw)
