"""One dispatch per op family: the torch form always works; accelerated forms (compiled
FlexAttention, later fla / mamba-ssm Triton kernels) are preferred where they can run.

`auto` tries the preferred implementations that declare themselves usable for the inputs
(e.g. CUDA tensors), in registration order, and falls back to the torch form. It falls back
only when an implementation *cannot be compiled* on this machine (no Triton, an old GPU, a
broken C++ toolchain); that is remembered, with one warning, until `clear_process_caches()`
(ops/caches.py: then the next call tries again, so every model pays the failed compile alike).
Every other error (out of memory, wrong shapes, a bug) propagates: switching backends would
hide it. Naming a backend explicitly runs it with no fallback.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

from speedlm.ops.caches import register as register_cache


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = getattr(exc, "inner_exception", None) or exc.__cause__


def is_compile_failure(exc: BaseException) -> bool:
    """True for errors that mean "this kernel cannot be built here": the compiler backend failed
    (no Triton, no C++ toolchain, an unsupported GPU), the backend is missing, or dynamo cannot
    trace the function. False for out-of-memory anywhere in the chain, and for errors of the
    computation itself that merely surface while compiling (`TorchRuntimeError`: a shape
    mismatch found during tracing is a bug, not a missing compiler)."""
    from torch._dynamo import exc as dynamo
    from torch._inductor.exc import CppCompileError, InvalidCxxCompiler

    if any(isinstance(e, torch.OutOfMemoryError) for e in _chain(exc)):
        return False
    cannot_build = (
        dynamo.BackendCompilerFailed,
        dynamo.InvalidBackend,
        dynamo.Unsupported,
        dynamo.InternalTorchDynamoError,
        CppCompileError,
        InvalidCxxCompiler,
        ImportError,
    )
    return isinstance(exc, cannot_build)


class Dispatch:
    """Implementations of one op family under names; call it like the op, plus `backend=`."""

    def __init__(self, family: str, fallback: str, fallback_fn: Callable):
        self.family = family
        self.fallback = fallback
        self._impls: dict[str, tuple[Callable, Callable]] = {}
        self.failed: dict[str, str] = {}  # name -> why it could not compile
        self.register(fallback, fallback_fn)
        register_cache(f"dispatch.{family}.failed", self.failed.clear, lambda: len(self.failed))

    def register(self, name: str, fn: Callable, usable: Callable[..., bool] = lambda *a, **k: True) -> None:
        self._impls[name] = (fn, usable)

    @property
    def backends(self) -> list[str]:
        return list(self._impls)

    def choose(self, *args, **kwargs) -> str:
        """The backend `auto` would try first for these inputs."""
        for name, (_, usable) in self._impls.items():
            if name != self.fallback and name not in self.failed and usable(*args, **kwargs):
                return name
        return self.fallback

    def __call__(self, *args, backend: str = "auto", **kwargs):
        if backend != "auto":
            if backend not in self._impls:
                raise ValueError(f"unknown {self.family} backend {backend!r}; use 'auto' or one of {self.backends}")
            return self._impls[backend][0](*args, **kwargs)
        while True:
            name = self.choose(*args, **kwargs)
            try:
                return self._impls[name][0](*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - filtered just below
                if name == self.fallback or not is_compile_failure(e):
                    raise
                lines = str(e).strip().splitlines()
                self.failed[name] = f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]
                warnings.warn(
                    f"{self.family}: the {name} backend cannot compile here ({self.failed[name]}); "
                    f"using {self.fallback} from now on",
                    stacklevel=2,
                )
