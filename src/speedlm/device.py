"""One answer to "which device?" for training, evaluation, generation and benchmarks."""

from __future__ import annotations

import torch

from speedlm.errors import SpeedlmError


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """"auto" (or None) -> cuda if available else cpu; otherwise a checked cpu/cuda device."""
    if name is None or name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise SpeedlmError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from None
    if dev.type not in ("cpu", "cuda"):
        raise SpeedlmError(f"speedlm runs on cpu or cuda, not {dev.type!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SpeedlmError(f"device {str(name)!r} requested but CUDA is not available; use cpu or auto")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def cpu_supports_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (x86: AVX-512-BF16 or AMX tiles;
    Arm: the BF16 extension). Without it torch emulates bf16, slower than float32."""
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(cpu, probe, None)
        try:
            if fn is not None and fn():
                return True
        except RuntimeError:
            pass
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.lower().startswith(("flags", "features")) and " bf16" in line for line in f)
    except OSError:
        return False


def check_dtype_supported(device: torch.device, dtype: torch.dtype) -> None:
    """A clear error for a dtype this device has no fast path for, before any work is done."""
    if device.type == "cpu" and dtype == torch.bfloat16 and not cpu_supports_bf16():
        raise SpeedlmError(
            "this CPU has no native bfloat16 matrix units (AVX-512-BF16, AMX or Arm BF16): bfloat16 would be "
            "emulated and slower than float32; use --dtype float32"
        )
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise SpeedlmError(f"{torch.cuda.get_device_name(device)} does not support bfloat16; use --dtype float16 or float32")
