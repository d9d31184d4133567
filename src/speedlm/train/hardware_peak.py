"""Peak FLOP/s for MFU (model FLOPs utilisation).

    MFU = model.flops_per_token(seq_len, training=True) * tokens_per_second / peak

The peak, in order of preference:
1. the user's number (`--peak-flops`, `TrainConfig.peak_flops`, or the `SPEEDLM_PEAK_FLOPS`
   environment variable): "given";
2. on CUDA, the datasheet dense bf16/fp16 peak when the GPU's name is in `KNOWN_PEAKS`:
   "datasheet";
3. otherwise the *measured* rate of large matmuls in the training dtype: "measured". It is
   measured once per machine (a few seconds: several sizes, the 90th-percentile rate of each
   size's calls, the best size) and cached in `$SPEEDLM_CACHE/peak_flops.json` under the machine's description
   (processor, threads, torch version, dtype), so two runs on one machine divide by the same
   number and MFU moves only with the throughput. `speedlm bench peak --remeasure` renews it.

Interference from other processes can only slow a matmul down, so a high percentile of the
rates over a few seconds is the least-biased estimate of what the hardware sustains (the 90th,
not the maximum: on this CPU a lone bf16 call now and then runs at twice the rate of every
other). MFU is capped at 1: a model
that outruns the cached peak means the peak was measured on a busy machine, and the trainer
says so once rather than printing 140 %.
"""

from __future__ import annotations

import json
import os
import platform
import time

import torch

# Dense (no sparsity) bf16 tensor-core peaks in FLOP/s, from NVIDIA datasheets. Matched as
# substrings of torch.cuda.get_device_name(), first match wins, so specific names go first.
KNOWN_PEAKS: list[tuple[str, float]] = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
]
CACHE_FILE = "peak_flops.json"
MEASURE_SECONDS = 3.0

_memo: dict[str, tuple[float, str]] = {}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def machine_key(device: str | torch.device, dtype: torch.dtype) -> str:
    """What a measured peak is valid for: the processor, the threads torch uses, the torch
    build and the dtype."""
    device = torch.device(device)
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{_cpu_name()} ({os.cpu_count()} cpus, {torch.get_num_threads()} threads)"
    return f"{where} | torch {torch.__version__} | {str(dtype).removeprefix('torch.')}"


def measure_peak_flops(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, budget_s: float = MEASURE_SECONDS) -> float:
    """The sustained FLOP/s of square matmuls on `device` in `dtype`: over about `budget_s`
    seconds split across a few sizes (large enough to saturate the device, small enough for
    several calls each), the 90th percentile of each size's per-call rates, best size. Runs
    with the RNG forked, so a seeded run's numbers never change."""
    device = torch.device(device)
    sizes = (4096, 8192) if device.type == "cuda" else (512, 1024, 2048)
    best = 0.0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for n in sizes:
            a = torch.randn(n, n, device=device, dtype=dtype)
            b = torch.randn(n, n, device=device, dtype=dtype)
            torch.mm(a, b)  # warm-up: kernel selection, thread pool start
            _sync(device)
            deadline = time.perf_counter() + budget_s / len(sizes)
            rates: list[float] = []
            while len(rates) < 3 or (time.perf_counter() < deadline and len(rates) < 10_000):
                t0 = time.perf_counter()
                torch.mm(a, b)
                _sync(device)
                rates.append(2.0 * n**3 / (time.perf_counter() - t0))
            rates.sort()
            best = max(best, rates[min(len(rates) - 1, int(0.9 * len(rates)))])
            del a, b
    return best


def known_peak_flops(device: str | torch.device, dtype: torch.dtype = torch.bfloat16) -> float | None:
    """Datasheet bf16/fp16 peak for a CUDA device whose name is in `KNOWN_PEAKS`, else None."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available() or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in KNOWN_PEAKS:
        if key in name:
            return peak
    return None


def _cache_path():
    from speedlm.data.cachedir import default_cache_dir

    return default_cache_dir() / CACHE_FILE


def _read_cache() -> dict:
    try:
        with open(_cache_path()) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):  # missing or damaged: measure again
        return {}


def _write_cache(key: str, flops: float) -> None:
    from speedlm.data.cachedir import atomic_write_text

    data = _read_cache()
    data[key] = {"flops": flops, "measured": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": MEASURE_SECONDS}
    try:
        atomic_write_text(_cache_path(), json.dumps(data, indent=2, sort_keys=True))
    except OSError:
        pass  # an unwritable cache only costs a re-measurement next time


def peak_flops(
    device: str | torch.device,
    dtype: torch.dtype = torch.float32,
    given: float | None = None,
    remeasure: bool = False,
) -> tuple[float, str]:
    """(peak FLOP/s, source) with source "given", "datasheet" or "measured" (see module doc)."""
    if given is None and os.environ.get("SPEEDLM_PEAK_FLOPS"):
        text = os.environ["SPEEDLM_PEAK_FLOPS"]
        try:
            given = float(text)
        except ValueError:
            given = -1.0
        if not given > 0:
            from speedlm.errors import SpeedlmError

            raise SpeedlmError(f"SPEEDLM_PEAK_FLOPS must be a positive number of FLOP/s (e.g. 2.5e11), got {text!r}")
    if given is not None:
        return float(given), "given"
    device = torch.device(device)
    known = known_peak_flops(device, dtype)
    if known is not None:
        return known, "datasheet"
    key = machine_key(device, dtype)
    if not remeasure:
        if key in _memo:
            return _memo[key]
        entry = _read_cache().get(key)
        if isinstance(entry, dict) and isinstance(entry.get("flops"), (int, float)) and entry["flops"] > 0:
            _memo[key] = (float(entry["flops"]), "measured")
            return _memo[key]
    flops = measure_peak_flops(device, dtype)
    _write_cache(key, flops)
    _memo[key] = (flops, "measured")
    return _memo[key]


def mfu(flops_per_token: float, tokens_per_s: float, peak: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak, at most 1 (see module doc)."""
    return min(1.0, flops_per_token * tokens_per_s / peak) if peak > 0 else 0.0
