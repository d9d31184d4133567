"""Wall-clock timing: median of `repeats` runs after `warmup` runs, device-synchronised."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so perf_counter brackets the work itself (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timing_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "time.perf_counter with torch.cuda.synchronize before and after each run"
    return "time.perf_counter around each run"


def time_fn(
    fn: Callable[[Any], Any],
    device: torch.device,
    *,
    repeats: int = 3,
    warmup: int = 1,
    setup: Callable[[], Any] | None = None,
) -> list[float]:
    """Seconds of each of `repeats` timed calls of `fn(setup())` after `warmup` untimed ones.

    `setup` (untimed, e.g. a decoding prefill) runs before every call and its result is passed
    to `fn`; without it `fn` gets None. Outputs are dropped right after each call.
    """
    samples: list[float] = []
    for i in range(warmup + repeats):
        state = setup() if setup is not None else None
        synchronize(device)
        t0 = time.perf_counter()
        out = fn(state)
        synchronize(device)
        dt = time.perf_counter() - t0
        del out, state
        if i >= warmup:
            samples.append(dt)
    return samples


def median(samples: list[float]) -> float:
    return float(statistics.median(samples))
