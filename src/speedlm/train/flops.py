"""Peak FLOP/s for MFU (model FLOPs utilisation).

    MFU = model.flops_per_token(seq_len, training=True) * tokens_per_second / peak

On CUDA the denominator is the datasheet dense bf16 peak of the GPU when its name is in
`KNOWN_PEAKS`. Otherwise (unknown GPUs, and always on CPU) it is the *measured* rate of a
large matmul (`measure_peak_flops`): bf16 on CUDA, float32 on CPU. A CPU has no meaningful
datasheet number for PyTorch, so on CPU MFU reads as "fraction of what this machine's
matmul achieves", not of a theoretical peak; it can therefore be close to (or, with noise,
slightly above) what a GPU MFU of the same code would suggest.
"""

from __future__ import annotations

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

_cache: dict[str, tuple[float, str]] = {}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak_flops(device: str | torch.device = "cpu", budget_s: float = 0.25) -> float:
    """Achieved FLOP/s of square matmuls on `device`, timed for about `budget_s` seconds.

    bf16 on CUDA (what training autocasts to), float32 on CPU (CPU training runs in fp32).
    The size is large enough to saturate the device but small enough that a single call
    stays well inside the budget on a laptop CPU.
    """
    device = torch.device(device)
    if device.type == "cuda":
        n, dtype = 4096, torch.bfloat16
    else:
        n, dtype = 512, torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)  # warm-up: kernel selection, thread pool start
    _sync(device)
    flops_per_mm = 2.0 * n**3
    iters, start = 0, time.perf_counter()
    while True:
        torch.mm(a, b)
        iters += 1
        if iters % 4 == 0 or device.type != "cuda":
            _sync(device)
            elapsed = time.perf_counter() - start
            if elapsed >= budget_s or iters >= 10_000:
                break
    return flops_per_mm * iters / elapsed


def known_peak_flops(device: str | torch.device) -> float | None:
    """Datasheet bf16 peak for a CUDA device whose name is in `KNOWN_PEAKS`, else None."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in KNOWN_PEAKS:
        if key in name:
            return peak
    return None


def peak_flops(device: str | torch.device) -> tuple[float, str]:
    """(peak FLOP/s, source) with source "datasheet" or "measured"; cached per device.

    The measurement draws random numbers, so it runs with the RNG state forked: calling
    this never changes the numbers a seeded training run sees.
    """
    device = torch.device(device)
    key = str(device)
    if key not in _cache:
        known = known_peak_flops(device)
        if known is not None:
            _cache[key] = (known, "datasheet")
        else:
            devices = [device] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                _cache[key] = (measure_peak_flops(device), "measured")
    return _cache[key]


def mfu(flops_per_token: float, tokens_per_s: float, peak: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak."""
    return flops_per_token * tokens_per_s / peak if peak > 0 else 0.0
