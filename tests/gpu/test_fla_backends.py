"""The fla-core Triton kernels behind the linear-recurrence dispatches == the float64 torch
references. Skipped without a GPU or without the `gpu` extra (`pip install -e .[gpu]`)."""

import pytest
import torch
import torch.nn.functional as F

from speedlm.ops import fla
from speedlm.ops.delta_rule import DELTA_RULE, delta_rule_recurrent
from speedlm.ops.gla import GLA, gla_recurrent
from speedlm.ops.hgrn import HGRN, hgrn_recurrent
from speedlm.ops.metrics import rel_rms_error

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and fla.fla_installed()), reason="needs CUDA and fla-core")


def _r(*shape):
    return torch.randn(*shape, device="cuda", dtype=torch.float32)


@pytest.mark.parametrize("per_channel", [True, False])
def test_fla_gla_matches_the_reference(per_channel):
    q, k, v = _r(2, 4, 300, 64), _r(2, 4, 300, 64), _r(2, 4, 300, 64)
    g = -torch.rand(2, 4, 300, 64 if per_channel else 1, device="cuda") * 0.5
    s0 = _r(2, 4, 64, 64)
    assert GLA.choose(q, k, v, g) == "fla"
    o, s = GLA(q, k, v, g, initial_state=s0)
    o_ref, s_ref = gla_recurrent(*(t.double() for t in (q, k, v, g)), initial_state=s0.double())
    assert rel_rms_error(o, o_ref) < 1e-3 and rel_rms_error(s, s_ref) < 1e-3


@pytest.mark.parametrize("gated", [False, True])
def test_fla_delta_rule_matches_the_reference(gated):
    q, k, v = F.normalize(_r(2, 4, 300, 64), dim=-1), F.normalize(_r(2, 4, 300, 64), dim=-1), _r(2, 4, 300, 64)
    beta = torch.rand(2, 4, 300, device="cuda")
    g = -torch.rand(2, 4, 300, device="cuda") if gated else None
    o, s = DELTA_RULE(q, k, v, beta, g)
    o_ref, s_ref = delta_rule_recurrent(q.double(), k.double(), v.double(), beta.double(), None if g is None else g.double())
    assert rel_rms_error(o, o_ref) < 1e-3 and rel_rms_error(s, s_ref) < 1e-3


def test_fla_hgrn_matches_the_reference():
    x, g = _r(2, 300, 128), -torch.rand(2, 300, 128, device="cuda")
    o, s = HGRN(x, g)
    o_ref, s_ref = hgrn_recurrent(x.double(), g.double())
    assert rel_rms_error(o, o_ref) < 1e-4 and rel_rms_error(s, s_ref) < 1e-4
