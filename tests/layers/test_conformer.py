"""The Conformer block (layers/conformer.py): its convolution module never leaks across time
in causal mode nor across the batch in any mode, is centred in encoders, and the block runs in
both kinds of model."""

import pytest
import torch

from speedlm.errors import SpeedlmError
from speedlm.layers.conformer import ConformerBlock, ConvModule
from speedlm.layers.dims import ModelDims
from speedlm.layers.mixer import SeqMeta
from speedlm.models import ModelConfig, build_model
from speedlm.ops.metrics import rel_rms_error

DIMS = ModelDims(d_model=32, n_heads=4, max_seq_len=128)


def conv(kernel=7):
    torch.manual_seed(0)
    m = ConvModule(32, kernel, 1e-6).double()
    torch.nn.init.normal_(m.pointwise_in.weight)
    return m


def x_of(t=40, b=3):
    return torch.randn(b, t, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(t))


@pytest.mark.parametrize("causal", [True, False])
def test_conv_module_reach_in_time_and_no_leak_across_rows(causal):
    m, x = conv(7), x_of()
    meta = SeqMeta(causal=causal)
    y = m(x, meta)
    x2 = x.clone()
    x2[:, 20] += 1.0
    changed = ((m(x2, meta) - y).abs().amax(dim=(0, 2)) > 0).nonzero()[:, 0].tolist()
    assert changed == (list(range(20, 27)) if causal else list(range(17, 24)))  # kernel 7: causal or centred
    x3 = x.clone()
    x3[1] += 1.0  # another row: batch-independent norms, nothing shared
    out = m(x3, meta)
    assert torch.equal(out[0], y[0]) and torch.equal(out[2], y[2])


def test_causal_conv_state_decodes_token_by_token():
    m, x = conv(5), x_of(30)
    full = m(x, SeqMeta())
    cache = m.depthwise.init_cache()
    with torch.no_grad():
        steps = [m(x[:, i : i + 1], SeqMeta(i), cache) for i in range(30)]
    assert rel_rms_error(torch.cat(steps, 1), full) < 1e-12
    assert cache.length == 4


def test_block_in_an_encoder_and_in_a_language_model():
    spec = {"mixer": {"name": "attention"}, "block": {"name": "conformer", "kernel": 5}}
    enc = build_model(ModelConfig(objective="classify", num_classes=4, input_dim=3, d_model=32, n_heads=4, n_layers=2,
                                  layers={"C": spec}, pattern="C"))
    feats = torch.randn(2, 20, 3)
    assert enc(feats).shape == (2, 4)
    lm = build_model("conformer-tiny")
    ids = torch.randint(0, 256, (2, 24))
    full = lm(ids)
    cache = lm.init_cache()
    with torch.no_grad():
        steps = [lm(ids[:, :10], cache)] + [lm(ids[:, i : i + 1], cache) for i in range(10, 24)]
    assert rel_rms_error(torch.cat(steps, 1), full) < 1e-5


def test_even_kernels_are_refused():
    with pytest.raises(SpeedlmError, match="must be odd"):
        ModelConfig(layers={"C": {"mixer": "attention", "block": {"name": "conformer", "kernel": 4}}}, pattern="C").validate()
    with pytest.raises(SpeedlmError, match="reversible layers need blocks"):
        ModelConfig(layers={"C": {"mixer": "attention", "block": "conformer"}}, pattern="C", reversible=True).validate()
    assert ConformerBlock.supports_reversible is False


def test_packed_documents_are_refused_rather_than_mixed_by_the_convolution():
    lm = build_model("conformer-tiny")
    ids = torch.randint(0, 256, (1, 12))
    with pytest.raises(SpeedlmError, match="would mix packed documents"):
        lm(ids, doc_ids=torch.tensor([[0] * 6 + [1] * 6]))


@pytest.mark.parametrize("causal", [True, False])
def test_conv_module_equals_its_written_out_reference(causal):
    import torch.nn.functional as F

    m, x = conv(5), x_of(23, b=2)
    h = F.glu(m.pointwise_in(m.norm(x)), dim=-1)
    w, k = m.depthwise.weight, m.depthwise.kernel
    cols = []
    for t in range(23):  # each output position's taps, written out
        acc = m.depthwise.bias.expand(2, -1).clone()
        for j in range(k):
            src = t - (k - 1) + j if causal else t - k // 2 + j
            if 0 <= src < 23:
                acc = acc + h[:, src] * w[:, j]
        cols.append(acc)
    ref = m.pointwise_out(F.silu(m.conv_norm(torch.stack(cols, 1))))
    assert rel_rms_error(m(x, SeqMeta(causal=causal)), ref) < 1e-12
