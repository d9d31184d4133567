"""mamba-ssm's kernels (and fla's simple-GLA kernel for SSD) behind the selective-scan and SSD
dispatches == the float64 torch references. Skipped without a GPU or without the kernel library
(`pip install -e .[mamba]` / `.[gpu]`, CUDA only)."""

import pytest
import torch
import torch.nn.functional as F

from speedlm.ops import fla, mamba_kernels
from speedlm.ops.metrics import rel_rms_error
from speedlm.ops.selective_scan import SELECTIVE_SCAN, selective_scan_recurrent
from speedlm.ops.ssd import SSD, ssd_recurrent

needs_mamba_ssm = pytest.mark.skipif(not (torch.cuda.is_available() and mamba_kernels.mamba_ssm_installed()),
                                     reason="needs CUDA and mamba-ssm")


def _r(*shape):
    return torch.randn(*shape, device="cuda", dtype=torch.float32)


@needs_mamba_ssm
def test_mamba_ssm_selective_scan_matches_the_reference():
    u, B, C = _r(2, 300, 128), _r(2, 300, 16), _r(2, 300, 16)
    delta = F.softplus(_r(2, 300, 128) - 2)
    A = -torch.arange(1, 17.0, device="cuda").expand(128, 16).contiguous()
    assert SELECTIVE_SCAN.choose(u, delta, A, B, C) == "mamba-ssm"
    y, s = SELECTIVE_SCAN(u, delta, A, B, C)
    y_ref, s_ref = selective_scan_recurrent(*(t.double() for t in (u, delta, A, B, C)))
    assert rel_rms_error(y, y_ref) < 1e-4 and rel_rms_error(s, s_ref) < 1e-4
    # with a carried state the kernel cannot serve the call: the torch form does
    assert SELECTIVE_SCAN.choose(u, delta, A, B, C, initial_state=s) == "torch"


@needs_mamba_ssm
def test_mamba_ssm_ssd_matches_the_reference():
    x, B, C = _r(2, 300, 8, 64), _r(2, 300, 2, 64), _r(2, 300, 2, 64)
    dt = F.softplus(_r(2, 300, 8) - 2)
    A = -torch.linspace(1.0, 16.0, 8, device="cuda")
    s0 = _r(2, 8, 64, 64)
    assert SSD.choose(x, dt, A, B, C) == "mamba-ssm"
    y, s = SSD(x, dt, A, B, C, initial_state=s0)
    y_ref, s_ref = ssd_recurrent(*(t.double() for t in (x, dt, A, B, C)), initial_state=s0.double())
    assert rel_rms_error(y, y_ref) < 1e-3 and rel_rms_error(s, s_ref) < 1e-3


@pytest.mark.skipif(not (torch.cuda.is_available() and fla.fla_installed()), reason="needs CUDA and fla-core")
def test_fla_simple_gla_serves_ssd():
    x, B, C = _r(2, 300, 8, 64), _r(2, 300, 2, 64), _r(2, 300, 2, 64)
    dt = F.softplus(_r(2, 300, 8) - 2)
    A = -torch.linspace(1.0, 16.0, 8, device="cuda")
    y, s = SSD(x, dt, A, B, C, backend="fla")
    y_ref, s_ref = ssd_recurrent(*(t.double() for t in (x, dt, A, B, C)))
    assert rel_rms_error(y, y_ref) < 1e-3 and rel_rms_error(s, s_ref) < 1e-3
