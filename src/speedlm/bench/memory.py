"""Peak memory of a region of code, above what was allocated when the region started.

CUDA: the caching allocator's peak counter (`reset_peak_memory_stats` / `max_memory_allocated`)
minus the allocation at the start of the region.

CPU: there is no allocator peak counter, so the region runs under
`torch.profiler.profile(activities=[CPU], profile_memory=True)`, which records one event per
allocation (+bytes) and free (-bytes). Sorted by time, their cumulative sum is the allocation
timeline relative to the start of the region; its maximum is the peak. The raw allocator records
are used rather than per-op `cpu_memory_usage` totals, because an op's total includes the
allocations of the ops nested in it (aten::ones -> aten::empty), which would count them twice.

Both report bytes of tensors allocated through PyTorch's allocators, not process RSS.
"""

from __future__ import annotations

import os

import torch

_MARK = "speedlm_bench::mark"


def memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus the allocation at region start"
    return (
        "torch.profiler (profile_memory=True): peak of the cumulative CPU alloc/free timeline, "
        "relative to region start, in one extra profiled run"
    )


def is_oom(exc: BaseException) -> bool:
    """True for out-of-memory failures (CUDA OOM, or the CPU allocator refusing a request)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    if isinstance(exc, (RuntimeError, MemoryError)):
        msg = str(exc).lower()
        return isinstance(exc, MemoryError) or "out of memory" in msg or "can't allocate memory" in msg
    return False


def peak_of_timeline(records: list[tuple[int, int]], since: int | None = None) -> int:
    """Peak of the cumulative sum of (time, +/-bytes) records, never below 0.

    With `since`, only the part of the timeline from that time on counts (the level reached
    before it still does: memory allocated earlier and still held is part of the later peak).
    """
    level = 0
    peak = 0 if since is None else None
    for t, nbytes in sorted(records, key=lambda r: r[0]):
        if peak is None and t >= since:
            peak = level  # what is held when the marked part starts
        level += nbytes
        if peak is not None:
            peak = max(peak, level)
    if peak is None:  # nothing happened after `since`
        peak = level
    return max(0, int(peak))


class PeakMemory:
    """`with PeakMemory(device) as pm: ...` then `pm.peak_bytes`.

    Call `pm.mark()` inside the region to count only the peak from that point on (allocations
    made before the mark and still held stay counted), e.g. decoding after an untimed prefill.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.method = memory_method(self.device)
        self.peak_bytes: int | None = None
        self._prof = None
        self._baseline = 0
        self._marked = False

    # ----- context -----
    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._baseline = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            # kineto prints a start/stop line per profile unless told otherwise; respect a user setting
            os.environ.setdefault("KINETO_LOG_LEVEL", "99")
            from torch.profiler import ProfilerActivity, profile

            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._prof.__enter__()
        return self

    def mark(self) -> None:
        self._marked = True
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with torch.profiler.record_function(_MARK):
                pass

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            if exc_type is None:
                self.peak_bytes = max(0, torch.cuda.max_memory_allocated(self.device) - self._baseline)
            return False
        self._prof.__exit__(exc_type, exc, tb)
        if exc_type is None:
            records, since = _cpu_records(self._prof)
            self.peak_bytes = peak_of_timeline(records, since if self._marked else None)
        self._prof = None
        return False


def _cpu_records(prof) -> tuple[list[tuple[int, int]], int | None]:
    """(time, +/-bytes) of every CPU allocator event in a finished profile, and the mark time."""
    cpu_like = {"CPU", "MKLDNN", "IDEEP"}
    results = getattr(getattr(prof, "profiler", None), "kineto_results", None)
    if results is not None:
        events = results.events()
        records = [
            (e.start_ns(), int(e.nbytes()))
            for e in events
            if e.name() == "[memory]" and e.device_type().name in cpu_like
        ]
        marks = [e.start_ns() for e in events if e.name() == _MARK]
        return records, (marks[0] if marks else None)
    # fallback: parsed events; only top-level ops (their totals include nested ops) + loose records
    events = prof.events()
    records = [
        (int(e.time_range.start * 1000), int(e.cpu_memory_usage))
        for e in events
        if e.cpu_memory_usage and (e.name == "[memory]" or e.cpu_parent is None)
    ]
    marks = [int(e.time_range.start * 1000) for e in events if e.name == _MARK]
    return records, (marks[0] if marks else None)


def cpu_peak_bytes(fn, *args, **kwargs) -> int:
    """Peak bytes allocated on the CPU while running `fn(*args, **kwargs)` (profiler timeline)."""
    with PeakMemory("cpu") as pm:
        out = fn(*args, **kwargs)
        del out
    return pm.peak_bytes

