"""The bidirectional encoder (models/encoder.py): every bidirectional mixer runs in it with
causal=False (any position sees any other), the wiring equals the mixers' references, causal-only
mixers are refused, and pooling and the front-ends work."""

import pytest
import torch

from speedlm.errors import SpeedlmError
from speedlm.models import MIXERS, ModelConfig, build_model
from speedlm.ops.metrics import rel_rms_error

BIDIRECTIONAL = [n for n, e in MIXERS.items() if e.cls.supports_bidirectional]
CAUSAL_ONLY = [n for n, e in MIXERS.items() if not e.cls.supports_bidirectional]


def encoder(mixer: str, **fields):
    torch.manual_seed(0)
    spec = {"name": mixer, **MIXERS[mixer].contract_spec}
    cfg = ModelConfig(objective="classify", num_classes=5, input_dim=3, d_model=32, n_heads=4, n_layers=2,
                      max_seq_len=64, layers={"A": {"mixer": spec}}, **fields)
    return build_model(cfg).double()


def features(t=33, b=2):
    return torch.randn(b, t, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(t))


@pytest.mark.parametrize("mixer", BIDIRECTIONAL)
def test_every_bidirectional_mixer_sees_both_sides_in_an_encoder(mixer):
    m, x = encoder(mixer), features()
    h = m.encode(x)
    x2 = x.clone()
    x2[:, 16] += 1.0
    moved = (m.encode(x2) - h).abs().amax(dim=(0, 2)) > 1e-9
    assert moved[:16].any() and moved[17:].any()  # positions before and after the change see it
    x3 = x.clone()
    x3[1] += 1.0
    assert torch.equal(m.encode(x3)[0], h[0])  # rows never mix
    logits = m(x)
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    total = m.loss(x, torch.tensor([1, 4])).total
    grads = torch.autograd.grad(total, list(m.parameters()), allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("mixer", BIDIRECTIONAL)
def test_the_encoder_is_its_mixers_references_composed(mixer, monkeypatch):
    m, x = encoder(mixer), features()
    fast = m.encode(x)
    for block in m.blocks:  # every mixer call through its naive float64 reference instead
        monkeypatch.setattr(block.mixer, "forward", lambda x, meta, cache=None, mixer=block.mixer: mixer.reference(x, meta))
    assert rel_rms_error(fast, m.encode(x)) < 1e-12


@pytest.mark.parametrize("mixer", CAUSAL_ONLY)
def test_a_causal_only_mixer_in_an_encoder_is_a_configuration_error(mixer):
    with pytest.raises(SpeedlmError, match="causal-only and cannot be used in an encoder"):
        encoder(mixer)


def test_class_token_pooling_and_token_ids_front_end():
    m = encoder("attention", pooling="cls")
    assert m.encode(features()).shape == (2, 34, 32)  # the class token first
    ids = build_model(ModelConfig(objective="classify", num_classes=3, d_model=32, n_heads=4, n_layers=1))
    assert ids(torch.randint(0, 256, (2, 9))).shape == (2, 3)
    with pytest.raises(SpeedlmError, match="needs num_classes >= 2"):
        ModelConfig(objective="classify").validate()
    with pytest.raises(SpeedlmError, match="longer than this encoder allows"):
        m(features(t=70))


def test_language_model_commands_refuse_encoders():
    from speedlm.models import resolve_config
    from speedlm.models.build import require_language_model

    with pytest.raises(SpeedlmError, match="is an encoder"):
        require_language_model(resolve_config("linformer-tiny"), "linformer-tiny")


def test_reversible_encoders_run_reversibly_and_bf16_takes_float32_features(monkeypatch):
    from speedlm.models import stack

    calls = []
    real = stack.reversible_forward
    monkeypatch.setattr(stack, "reversible_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    m = encoder("attention", reversible=True)
    m.loss(features(), torch.tensor([0, 1])).total.backward()
    assert calls == [1]
    bf = encoder("attention").bfloat16()
    assert bf(features().float()).dtype == torch.bfloat16
