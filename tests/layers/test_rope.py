"""RoPE properties (Su et al. 2021): relative positions only, rotation (norm-preserving), the
half-split pair layout, and equality with the complex-number form."""

import pytest
import torch

from speedlm.layers.rope import apply_rope, rope_for, rope_reference
from speedlm.ops.metrics import rel_rms_error

DH, THETA = 16, 10000.0


def rope(x, positions):
    """x (B, H, T, Dh) at an int start or (B, T) positions, through the fast path."""
    cos, sin = rope_for(positions, x.shape[-2], DH, THETA, x.device)
    return apply_rope(x, cos, sin)


def at(vec, pos):
    """One vector (Dh,) rotated at one position."""
    return rope(vec.view(1, 1, 1, DH), pos)[0, 0, 0]


def test_scores_depend_only_on_the_distance():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(DH, dtype=torch.float64, generator=g), torch.randn(DH, dtype=torch.float64, generator=g)
    for i, j in [(5, 2), (40, 3), (7, 7), (2, 9)]:
        base = at(q, i) @ at(k, j)
        for shift in (1, 13, 1000, 123457):
            assert (at(q, i + shift) @ at(k, j + shift) - base).abs() < 1e-9
    # and it does depend on the distance
    assert (at(q, 5) @ at(k, 2) - at(q, 6) @ at(k, 2)).abs() > 1e-3


def test_rotation_preserves_norms_and_position_zero_is_the_identity():
    x = torch.randn(2, 3, 11, DH, dtype=torch.float64)
    y = rope(x, 17)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-12)
    assert torch.equal(rope(x[:, :, :1], 0), x[:, :, :1])


@pytest.mark.parametrize("positions", ["start", "rows"])
def test_equals_the_complex_rotation_reference(positions):
    x = torch.randn(3, 2, 9, DH, dtype=torch.float64)
    if positions == "start":
        pos_arg, pos = 41, torch.arange(41, 50)[None]
    else:
        pos = torch.stack([torch.arange(9), torch.arange(100, 109), torch.arange(9) * 3])
        pos_arg = pos
    assert rel_rms_error(rope(x, pos_arg), rope_reference(x, pos, THETA)) < 1e-14


def test_half_split_layout_pairs_channel_i_with_channel_i_plus_half():
    half = DH // 2
    for i in (0, 1, half - 1):
        e = torch.zeros(DH, dtype=torch.float64)
        e[i] = 1.0
        p = 3
        angle = p * THETA ** (-2 * i / DH)
        y = at(e, p)
        expected = torch.zeros(DH, dtype=torch.float64)
        expected[i], expected[i + half] = torch.cos(torch.tensor(angle)), torch.sin(torch.tensor(angle))
        assert torch.allclose(y, expected, atol=1e-12), i


def test_large_positions_stay_exact_in_float32():
    """Angles are computed in float64, so positions far past 2^11 lose nothing in float32."""
    x = torch.randn(1, 1, 4, DH, dtype=torch.float64)
    pos = torch.arange(1_000_000, 1_000_004)[None]
    assert rel_rms_error(rope(x.float(), 1_000_000), rope_reference(x, pos, THETA)) < 1e-6


@pytest.mark.parametrize("name", ["attention", "sliding_window"])
def test_attention_without_positions_sees_only_order(name):
    """positions="none" (Jamba's attention): bidirectional full attention is then equivariant to
    permutations of the sequence, which RoPE breaks; the option changes nothing else."""
    from speedlm.layers.dims import ModelDims
    from speedlm.layers.mixer import SeqMeta
    from speedlm.models.registry import MIXERS

    dims = ModelDims(d_model=32, n_heads=4, max_seq_len=64)
    spec = {"window": 64} if name == "sliding_window" else {}
    torch.manual_seed(0)
    plain = MIXERS[name].cls(dims, **spec).double()
    nope = MIXERS[name].cls(dims, **spec, positions="none").double()
    nope.load_state_dict(plain.state_dict())
    x = torch.randn(2, 21, 32, dtype=torch.float64)
    perm = torch.randperm(21)
    bidi = SeqMeta(causal=False)
    assert rel_rms_error(nope(x[:, perm], bidi), nope(x, bidi)[:, perm]) < 1e-12
    assert rel_rms_error(plain(x[:, perm], bidi), plain(x, bidi)[:, perm]) > 1e-3
    assert rel_rms_error(nope(x[:, :1], SeqMeta()), plain(x[:, :1], SeqMeta())) < 1e-12  # position 0: no rotation
