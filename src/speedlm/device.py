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
