"""Adapters to the Triton kernels of flash-linear-attention (`fla-core`, the `gpu` extra), behind
the same signatures as the torch forms, for the dispatches in ops/gla.py, ops/delta_rule.py and
ops/hgrn.py. They are used only on CUDA tensors and only when `fla` imports; everywhere else the
torch forms run. fla lays tensors out as (B, T, H, D); ours are (B, H, T, D).

These adapters follow fla-core's documented API (`fla.ops.gla.chunk_gla`,
`fla.ops.simple_gla.chunk_simple_gla`, `fla.ops.delta_rule.chunk_delta_rule`,
`fla.ops.gated_delta_rule.chunk_gated_delta_rule`, `fla.ops.hgrn.fused_recurrent_hgrn`);
`tests/gpu/test_fla_backends.py` compares each with the float64 reference where a GPU and fla
are present.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from speedlm.ops.caches import register_functools_cache


@functools.cache
def fla_installed() -> bool:
    return importlib.util.find_spec("fla") is not None


register_functools_cache("fla.installed", fla_installed)  # clearing looks again


def fla_usable(q: torch.Tensor, *args, **kwargs) -> bool:
    return q.is_cuda and fla_installed()


def _bthd(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).contiguous()


def gla(q, k, v, g, scale=None, initial_state=None, chunk_size: int = 64):
    if g.shape[-1] == 1:  # one decay per head
        from fla.ops.simple_gla import chunk_simple_gla

        o, s = chunk_simple_gla(_bthd(q), _bthd(k), _bthd(v), g=g[..., 0].transpose(1, 2).contiguous(), scale=scale,
                                initial_state=initial_state, output_final_state=True)
    else:
        from fla.ops.gla import chunk_gla

        o, s = chunk_gla(_bthd(q), _bthd(k), _bthd(v), _bthd(g), scale=scale, initial_state=initial_state,
                         output_final_state=True)
    return o.transpose(1, 2), s


def delta_rule(q, k, v, beta, g=None, scale=None, initial_state=None, chunk_size: int = 64):
    b = beta.transpose(1, 2).contiguous()
    if g is None:
        from fla.ops.delta_rule import chunk_delta_rule

        o, s = chunk_delta_rule(_bthd(q), _bthd(k), _bthd(v), b, scale=scale, initial_state=initial_state,
                                output_final_state=True)
    else:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        o, s = chunk_gated_delta_rule(_bthd(q), _bthd(k), _bthd(v), g.transpose(1, 2).contiguous(), b, scale=scale,
                                      initial_state=initial_state, output_final_state=True)
    return o.transpose(1, 2), s


def hgrn(x, g, initial_state=None, chunk_size: int = 64):
    from fla.ops.hgrn import fused_recurrent_hgrn

    return fused_recurrent_hgrn(x.contiguous(), g.contiguous(), initial_state=initial_state, output_final_state=True)
