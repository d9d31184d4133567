"""Adapters to mamba-ssm's CUDA / Triton kernels (`mamba-ssm`, the `gpu` extra), behind the same
signatures as the torch forms in ops/selective_scan.py and ops/ssd.py. They are used only on
CUDA tensors and only when `mamba_ssm` imports; everywhere else the torch forms run.

These follow mamba-ssm's documented API: `mamba_ssm.ops.selective_scan_interface.
selective_scan_fn(u, delta, A, B, C, ..., return_last_state)` with u, delta (B, D, T) and
B, C (B, N, T), which takes no initial state (so the dispatch uses it only for calls that start
from an empty state), and `mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined(x, dt,
A, B, C, chunk_size, initial_states, return_final_states)` in our (B, T, H, P) layout.
`tests/gpu/test_mamba_backends.py` compares both with the float64 references where a GPU and
mamba-ssm are present.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from speedlm.ops.caches import register_functools_cache


@functools.cache
def mamba_ssm_installed() -> bool:
    return importlib.util.find_spec("mamba_ssm") is not None


register_functools_cache("mamba_kernels.installed", mamba_ssm_installed)  # clearing looks again


def selective_scan_usable(u: torch.Tensor, *args, initial_state=None, **kwargs) -> bool:
    state = args[4] if len(args) > 4 else initial_state
    return u.is_cuda and state is None and u.shape[1] > 1 and mamba_ssm_installed()


def ssd_usable(x: torch.Tensor, *args, **kwargs) -> bool:
    return x.is_cuda and x.shape[1] > 1 and mamba_ssm_installed()


def selective_scan(u, delta, A, B, C, initial_state=None, chunk_size: int = 32):
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    if initial_state is not None:
        raise ValueError("mamba-ssm's selective_scan_fn takes no initial state; use the torch backend")
    y, last = selective_scan_fn(u.transpose(1, 2).contiguous(), delta.transpose(1, 2).contiguous(), A.contiguous(),
                                B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(), return_last_state=True)
    return y.transpose(1, 2), last


def ssd(x, dt, A, B, C, initial_state=None, chunk_size: int = 64):
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    y, final = mamba_chunk_scan_combined(x.contiguous(), dt.contiguous(), A.contiguous(), B.contiguous(), C.contiguous(),
                                         chunk_size=chunk_size, initial_states=initial_state, return_final_states=True)
    return y, final
