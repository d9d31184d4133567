"""Adaptive Attention Span (layers/adaptive_span.py, ops/adaptive_span_attention.py): the soft mask
is the paper's ramp, the span learns only through keys on the ramp, its penalty reaches the
model's loss, and attention and cache are trimmed to the current reach. (The shared contract
suite covers causality, caches, references, gradients, documents and KV policies.)"""

import pytest
import torch

from speedlm.layers.adaptive_span import AdaptiveSpanAttention
from speedlm.layers.dims import ModelDims
from speedlm.layers.mixer import AuxLosses, SeqMeta
from speedlm.models import ModelConfig, build_model, preset_config
from speedlm.ops.adaptive_span_attention import span_mask
from speedlm.ops.metrics import rel_rms_error

DIMS = ModelDims(d_model=32, n_heads=4, max_seq_len=256)


def mixer(**options):
    torch.manual_seed(0)
    return AdaptiveSpanAttention(DIMS, **{"max_span": 64, "ramp": 4, **options}).double()


def x_of(t, b=2):
    return torch.randn(b, t, DIMS.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(t))


def test_mask_is_one_inside_the_span_linear_on_the_ramp_and_zero_beyond():
    spans = torch.tensor([10.0, 2.5], dtype=torch.float64)
    distance = torch.arange(20)[None, None, :]  # (1, 1, 20)
    m = span_mask(distance, spans, ramp=4)[0, :, 0]  # (H, 20)
    assert torch.all(m[0, :11] == 1) and torch.all(m[0, 14:] == 0)
    assert torch.allclose(m[0, 11:14], torch.tensor([0.75, 0.5, 0.25], dtype=torch.float64))
    assert torch.all(m[1, :3] == 1) and torch.all(m[1, 7:] == 0)
    assert torch.allclose(m[1, 3:7], (4 + 2.5 - torch.arange(3, 7, dtype=torch.float64)) / 4)


def test_span_gradient_flows_only_through_keys_on_the_ramp():
    x = x_of(12, b=1)
    # every key (distance <= 11) strictly inside every span: m == 1, the span gets no gradient
    inside = mixer(init_span=0.5)  # 32 tokens
    (g,) = torch.autograd.grad(inside(x, SeqMeta()).square().sum(), [inside.span])
    assert torch.all(g == 0)
    # spans of 2.5 and 6: distances 3..6 and 7..9 are on the ramps, the others' span is 0
    ramped = mixer(init_span=[2.5 / 64, 6 / 64, 0.0, 0.5])
    (g,) = torch.autograd.grad(ramped(x, SeqMeta()).square().sum(), [ramped.span])
    assert g[0] != 0 and g[1] != 0 and g[3] == 0
    # a span of 0 with a ramp of 4: distances 1..3 are on the ramp
    assert g[2] != 0
    # and the reference agrees
    (g_ref,) = torch.autograd.grad(ramped.reference(x, SeqMeta()).square().sum(), [ramped.span])
    assert rel_rms_error(g, g_ref) < 1e-10


def test_the_clamp_keeps_a_span_outside_zero_one_trainable_back_inside():
    m = mixer(init_span=[-0.1, 1.2, 0.3, 0.3])
    assert torch.equal(m.spans()[:2], torch.tensor([0.0, 64.0], dtype=torch.float64))
    # the penalty pushes every span down: the one below 0 gets no push further out, the one
    # above 1 is pulled back inside
    (g,) = torch.autograd.grad(m.spans().sum(), [m.span])
    assert g[0] == 0 and g[1] > 0 and g[2] > 0


def test_penalty_is_an_auxiliary_loss_of_the_model():
    cfg = ModelConfig(
        vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, pattern="P",
        layers={"P": {"mixer": {"name": "adaptive_span", "max_span": 32, "ramp": 4, "init_span": 0.25, "penalty": 1e-3}}},
    )
    model = build_model(cfg)
    ids = torch.randint(0, 64, (2, 21))
    loss = model.loss(ids[:, :-1], ids[:, 1:])
    assert set(loss.parts) == {"lm", "adaptive_span"}
    # per layer: penalty * mean span in tokens = 1e-3 * 8; two layers
    assert loss.parts["adaptive_span"].item() == pytest.approx(2 * 1e-3 * 8)
    assert loss.total.item() == pytest.approx(sum(v.item() for v in loss.parts.values()), rel=1e-6)
    spans = [b.mixer.span for b in model.blocks]
    grads = torch.autograd.grad(loss.parts["adaptive_span"], spans)
    assert all(torch.all(g > 0) for g in grads)  # the penalty shrinks every head's span
    aux = AuxLosses()
    model.blocks[0].mixer(torch.randn(1, 5, 32), SeqMeta(aux=aux))
    assert set(aux.parts) == {"adaptive_span"}


def test_reach_follows_the_longest_span_and_is_capped_at_max_span():
    assert mixer(init_span=[0.1, 0.2, 0.25, 0.0]).span_window() == 16 + 4
    assert mixer(init_span=[0.1, 0.2, 0.26, 0.0]).span_window() == 17 + 4  # ceil(16.64)
    assert mixer(init_span=1.0).span_window() == 64


@torch.no_grad()
def test_cache_and_attention_are_trimmed_to_the_reach():
    m = mixer(init_span=[0.25, 0.1, 0.0, 0.05])  # reach 16 + 4
    t = 53
    x = x_of(t, b=1)
    cache = m.init_cache()
    out = torch.cat([m(x[:, i : i + 1], SeqMeta(start=i), cache) for i in range(t)], dim=1)
    assert cache.length == m.span_window() - 1  # the next query brings itself: reach keys in all
    assert m.state_bytes(t, bytes_per_elem=8) == cache.nbytes()
    assert rel_rms_error(out, m(x, SeqMeta())) < 1e-12
    # keys beyond the reach do not affect the output
    x2 = x.clone()
    x2[:, : t - m.span_window()] += torch.randn_like(x2[:, : t - m.span_window()])
    y, y2 = m(x, SeqMeta()), m(x2, SeqMeta())
    assert torch.equal(y[:, -1], y2[:, -1])
    assert not torch.equal(y[:, t - m.span_window()], y2[:, t - m.span_window()])  # this query sees the changed key at reach - 1
    # flops follow the reach: a shorter span costs less
    assert mixer(init_span=0.0).flops_per_token(200) < m.flops_per_token(200)


@pytest.mark.parametrize("t", [1, 63, 75, 301])
def test_fast_path_equals_the_dense_reference_on_odd_lengths(t):
    m = mixer(init_span=[0.3, 0.05, 0.6, 0.0], kv_heads=2)  # reach 38 + 4: several query blocks at 301
    x = x_of(t)
    assert rel_rms_error(m(x, SeqMeta()), m.reference(x, SeqMeta())) < 1e-12
    positions = torch.stack([torch.arange(5, 5 + t), torch.arange(100, 100 + t)])
    assert rel_rms_error(m(x, SeqMeta(positions=positions)), m.reference(x, SeqMeta(positions=positions))) < 1e-12


def test_repeated_positions_fall_back_to_every_causal_key():
    """Left padding that repeats a position breaks the index bound of the banded form."""
    m = mixer(init_span=0.0)  # reach 4; the query at position 1 sees all 150 keys at position 0
    x = x_of(200, b=1)
    positions = torch.cat([torch.zeros(150, dtype=torch.long), torch.arange(1, 51)])[None]
    meta = SeqMeta(positions=positions)
    assert rel_rms_error(m(x, meta), m.reference(x, meta)) < 1e-12


def test_init_span_is_validated_and_the_preset_builds_in_every_size():
    from speedlm.errors import SpeedlmError
    from speedlm.models.registry import MIXERS

    for bad in (1.5, [0.1, 0.2]):
        with pytest.raises(SpeedlmError, match="init_span"):
            MIXERS.check({"name": "adaptive_span", "init_span": bad}, "test", dims=DIMS)
    for size in ("tiny", "small", "base"):
        cfg = preset_config(f"adaptive-span-{size}")
        spec = cfg.layers["P"]["mixer"] if isinstance(cfg.layers["P"], dict) else cfg.layers["P"].mixer
        assert spec["max_span"] == cfg.max_seq_len
