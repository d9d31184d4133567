"""Softmax attention's projection and position options (layers/attention.py: qkv_bias, qk_norm,
head_dim, rope_dim, output_gate). The contract suite runs every option (OPTION_VARIANTS); here:
the configurations they refuse, and partial rotary against transformers' own rotation."""

import pytest
import torch

from speedlm.errors import SpeedlmError
from speedlm.layers.attention import Attention
from speedlm.layers.dims import ModelDims
from speedlm.models.registry import MIXERS

DIMS = ModelDims(d_model=32, n_heads=4)  # heads of 8 by default


@pytest.mark.parametrize("options, reason", [
    ({"rope_dim": 5}, "rope_dim=5 must be even"),
    ({"rope_dim": 10}, "at most head_dim=8"),
    ({"head_dim": 12, "rope_dim": 14}, "at most head_dim=12"),
    ({"positions": "none", "rope_dim": 4}, "rope_dim=4 rotates nothing"),
    ({"head_dim": 7}, "head_dim=7 must be even for RoPE"),
    ({"head_dim": 0}, "head_dim"),
])
def test_inconsistent_options_are_one_line_config_errors(options, reason):
    with pytest.raises(SpeedlmError, match=reason):
        MIXERS.check({"name": "attention", **options}, "mixer", DIMS)


def test_an_odd_head_is_fine_when_only_an_even_part_of_it_rotates_or_nothing_does():
    MIXERS.check({"name": "attention", "head_dim": 7, "rope_dim": 4}, "mixer", DIMS)
    MIXERS.check({"name": "sliding_window", "head_dim": 7, "positions": "none"}, "mixer", DIMS)


def test_head_dim_sets_the_width_of_projections_cache_and_flops():
    wide, plain = Attention(DIMS, kv_heads=2, head_dim=16), Attention(DIMS, kv_heads=2)
    assert wide.q_proj.weight.shape == (4 * 16, 32) and wide.k_proj.weight.shape == (2 * 16, 32)
    assert wide.o_proj.weight.shape == (32, 4 * 16)
    assert wide.state_bytes(100) == 2 * plain.state_bytes(100)
    assert wide.flops_breakdown(100).matmul == 2 * plain.flops_breakdown(100).matmul


def test_partial_rotary_is_transformers_rotation_of_the_first_rope_dim_channels():
    transformers = pytest.importorskip("transformers")  # noqa: F841
    from transformers.models.qwen3_next.modeling_qwen3_next import apply_rotary_pos_emb

    mixer = Attention(DIMS, head_dim=16, rope_dim=4).double()
    t, r = 11, 4
    q = torch.randn(2, 4, t, 16, dtype=torch.float64)
    cos, sin = mixer._rope_table(0, t, q)  # (T, r / 2)
    ours = mixer._rotate(q, cos, sin)
    # transformers' tables: the r / 2 frequencies of theta^(-2i / r), repeated for both halves
    inv_freq = mixer.rope_theta ** (-torch.arange(0, r, 2, dtype=torch.float64) / r)
    ang = torch.arange(t, dtype=torch.float64)[:, None] * inv_freq
    emb = torch.cat([ang, ang], dim=-1)[None]
    theirs, _ = apply_rotary_pos_emb(q, q, emb.cos(), emb.sin())
    assert torch.allclose(ours, theirs, atol=1e-12)
    assert torch.equal(ours[..., r:], q[..., r:])  # the rest passes through
    pos = torch.arange(t)[None]
    assert torch.allclose(mixer._rotate_reference(q, pos), theirs, atol=1e-12)
