"""Lite Transformer LSRA (layers/lite_transformer.py): both convolution kinds equal their
written-out reference in both directions, the convolution branch is local (causal or centred),
the attention branch global, and bad options are one line."""

import pytest
import torch

from speedlm.errors import SpeedlmError
from speedlm.layers.dims import ModelDims
from speedlm.layers.lite_transformer import LiteTransformerLSRA
from speedlm.layers.mixer import SeqMeta
from speedlm.models import ModelConfig
from speedlm.ops.metrics import rel_rms_error

DIMS = ModelDims(d_model=32, n_heads=4, max_seq_len=128)


def make(**kw):
    torch.manual_seed(0)
    return LiteTransformerLSRA(DIMS, **kw).double()


def x_of(t=31):
    return torch.randn(2, t, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(t))


@pytest.mark.parametrize("conv", ["lightweight", "dynamic"])
@pytest.mark.parametrize("causal", [True, False])
def test_fast_form_equals_reference(conv, causal):
    m, x = make(conv=conv, kernel=5), x_of()
    meta = SeqMeta(causal=causal)
    assert rel_rms_error(m(x, meta), m.reference(x, meta)) < 1e-12


@pytest.mark.parametrize("causal", [True, False])
def test_the_convolution_branch_is_local_and_the_attention_branch_global(causal):
    m, x = make(kernel=5), x_of()
    meta = SeqMeta(causal=causal)
    with torch.no_grad():
        m.attn.o_proj.weight.zero_()  # the convolution branch alone
    y = m(x, meta)
    x2 = x.clone()
    x2[:, 15, 16:] += 1.0  # the convolution half of position 15
    changed = ((m(x2, meta) - y).abs().amax(dim=(0, 2)) > 0).nonzero()[:, 0].tolist()
    assert changed == (list(range(15, 20)) if causal else list(range(13, 18)))
    full = make(kernel=5)
    y = full(x, meta)
    x3 = x.clone()
    x3[:, 15, :16] += 1.0  # the attention half reaches every position it may see
    changed = ((full(x3, meta) - y).abs().amax(dim=(0, 2)) > 0).nonzero()[:, 0].tolist()
    assert changed == (list(range(15, 31)) if causal else list(range(31)))


def test_lightweight_taps_are_softmax_normalised_and_shared_by_each_group():
    m = make(conv="lightweight", kernel=3, conv_heads=2)
    w = m._kernels(torch.zeros(1, 4, 16, dtype=torch.float64))
    assert w.shape == (1, 4, 2, 3) and torch.allclose(w.sum(-1), torch.ones(1, 4, 2, dtype=torch.float64))


@pytest.mark.parametrize("opts, needle", [({"kernel": 4}, "must be odd"), ({"conv_heads": 3}, "must divide")])
def test_bad_options_are_one_line(opts, needle):
    with pytest.raises(SpeedlmError, match=needle):
        ModelConfig(d_model=32, n_heads=4, layers={"L": {"mixer": {"name": "lite_transformer", **opts}}}, pattern="L").validate()
