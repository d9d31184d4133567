"""The compiled selective scan (ops/selective_scan_compiled.py) == the float64 sequential
reference: outputs, final states and every gradient, in float32 (what models run), on lengths
that pad the last forward chunk and leave the backward an all-padding chunk, with an initial
state. And the dispatch picks it exactly where README says: CPU, no gradients, >= 1,024 tokens.

One Inductor compile per process (about a minute cold on 2 cores, seconds from its disk cache):
the tests share it by living in one module."""

from __future__ import annotations

import pytest
import torch

from ops.test_state_space import scan_inputs
from speedlm.ops.metrics import rel_rms_error
from speedlm.ops.selective_scan import COMPILE_MIN_LENGTH, SELECTIVE_SCAN, selective_scan_recurrent
from speedlm.ops.selective_scan_compiled import BACKWARD_STEPS, FORWARD_STEPS, selective_scan_compiled


@pytest.mark.parametrize("t", [FORWARD_STEPS * 2 + BACKWARD_STEPS - 3, FORWARD_STEPS * 3 - 3])
def test_compiled_scan_matches_the_float64_reference_with_gradients(t):
    # t = 37: the last forward chunk pads 11 steps, so the backward's last chunk is all padding;
    # t = 45: it pads 3
    g = torch.Generator().manual_seed(t)
    x = scan_inputs(t, g)
    h0 = torch.randn(2, x["u"].shape[2], x["A"].shape[1], dtype=torch.float64, generator=g)
    ref_in = [v.clone().requires_grad_() for v in (*x.values(), h0)]
    fast_in = [v.float().requires_grad_() for v in (*x.values(), h0)]
    y_ref, h_ref = selective_scan_recurrent(*ref_in[:5], initial_state=ref_in[5])
    y, h = selective_scan_compiled(*fast_in[:5], initial_state=fast_in[5])
    assert rel_rms_error(y, y_ref) < 1e-5 and rel_rms_error(h, h_ref) < 1e-5
    gy, gh = torch.randn_like(y_ref), torch.randn_like(h_ref)
    ref_grads = torch.autograd.grad((y_ref * gy).sum() + (h_ref * gh).sum(), ref_in)
    grads = torch.autograd.grad((y * gy.float()).sum() + (h * gh.float()).sum(), fast_in)
    for name, a, b in zip(["u", "delta", "A", "B", "C", "h0"], grads, ref_grads):
        assert rel_rms_error(a, b) < 1e-4, name


def test_inference_on_long_cpu_inputs_takes_the_compiled_kernel_and_training_stays_eager():
    g = torch.Generator().manual_seed(0)
    long_ = {k: v.float() for k, v in scan_inputs(COMPILE_MIN_LENGTH, g).items()}
    short = {k: v[:, : COMPILE_MIN_LENGTH - 1] if v.dim() == 3 else v for k, v in long_.items()}
    assert SELECTIVE_SCAN.choose(*long_.values()) == "compiled"
    assert SELECTIVE_SCAN.choose(*short.values()) == "torch"
    with torch.no_grad():
        assert SELECTIVE_SCAN.choose(*{k: v.requires_grad_() for k, v in long_.items()}.values()) == "compiled"
    assert SELECTIVE_SCAN.choose(*long_.values()) == "torch"  # gradients wanted: the eager form
