"""What the contract suite cannot see in the state-space mixers: the paper's initialisation,
Hymba's choice of global layers and its full-attention variant, and the mixers' declared state."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from speedlm.layers.attention import Attention
from speedlm.layers.dims import ModelDims
from speedlm.layers.hymba import Hymba, is_global_layer
from speedlm.layers.mamba import Mamba
from speedlm.layers.mamba2 import Mamba2
from speedlm.layers.mixer import SeqMeta
from speedlm.layers.sparse_attention import SlidingWindowAttention
from speedlm.ops.metrics import rel_rms_error

DIMS = ModelDims(d_model=64, n_heads=4, max_seq_len=256)


def test_mamba_initialisation_follows_the_paper():
    torch.manual_seed(0)
    m = Mamba(DIMS, d_state=16)
    a = -torch.exp(m.A_log)
    assert torch.allclose(a, -torch.arange(1, 17.0).expand(128, 16))  # S4D-real, every channel
    assert torch.all(m.D == 1)
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 1e-4 - 1e-9 and dt.max() <= 0.1 + 1e-6
    # log-uniform over three decades: the geometric mean near sqrt(1e-3 * 1e-1) = 1e-2
    assert 5e-3 < math.exp(dt.log().mean().item()) < 2e-2
    assert m.dt_proj.weight.abs().max() <= m.dt_rank**-0.5
    assert m.dt_rank == math.ceil(64 / 16)


def test_mamba2_initialisation_follows_the_paper():
    torch.manual_seed(0)
    m = Mamba2(ModelDims(d_model=256, n_heads=4), d_state=16, head_dim=8)  # 64 heads
    a = torch.exp(m.A_log)
    assert a.min() >= 1.0 and a.max() <= 16.0 and a.std() > 2.0  # U[1, 16]
    dt = F.softplus(m.dt_bias)
    assert dt.min() >= 1e-4 - 1e-9 and dt.max() <= 0.1 + 1e-6
    assert torch.all(m.D == 1) and torch.all(m.norm_weight == 1)


def test_gated_deltanet_decay_initialises_as_mamba2():
    from speedlm.layers.deltanet import GatedDeltaNet
    from speedlm.layers.init import inverse_softplus

    m = GatedDeltaNet(ModelDims(d_model=256, n_heads=64))
    a, dt = torch.exp(m.A_log), F.softplus(m.dt_bias)
    assert a.min() >= 1.0 and a.max() <= 16.0 and a.std() > 2.0  # U[1, 16]
    assert dt.min() >= 1e-4 - 1e-9 and dt.max() <= 0.1 + 1e-6
    y = torch.tensor([1e-4, 1e-2, 1.0, 20.0], dtype=torch.float64)
    torch.testing.assert_close(F.softplus(inverse_softplus(y)), y, rtol=1e-12, atol=0)


def test_mamba2_refuses_a_head_dim_that_does_not_divide_the_inner_width():
    from speedlm.errors import SpeedlmError

    with pytest.raises(SpeedlmError, match="head_dim"):
        Mamba2(DIMS, head_dim=48)


def test_ssm_state_does_not_grow_with_the_context():
    for m in (Mamba(DIMS), Mamba2(DIMS, head_dim=32)):
        assert m.state_bytes(1024) == m.state_bytes(1_000_000)
    assert Mamba(DIMS, d_state=16).state_bytes(100, 1, 4) == 128 * 16 * 4 + 3 * 128 * 4


@pytest.mark.parametrize("n_layers, expected", [(1, [0]), (2, [0, 1]), (6, [0, 3, 5]), (12, [0, 6, 11])])
def test_hymba_global_layers_are_the_first_middle_and_last(n_layers, expected):
    assert [i for i in range(n_layers) if is_global_layer(i, n_layers)] == expected
    kinds = [type(Hymba(ModelDims(64, 4, layer_idx=i, n_layers=n_layers), window=16).attn) for i in range(n_layers)]
    assert all((k is Attention) == (i in expected) for i, k in enumerate(kinds))
    assert all(k is SlidingWindowAttention for i, k in enumerate(kinds) if i not in expected)


@torch.no_grad()
def test_hymba_with_full_attention_decodes_as_its_reference():
    """The contract suite runs the sliding-window variant; the global layers' variant here."""
    torch.manual_seed(2)
    m = Hymba(ModelDims(d_model=32, n_heads=4, max_seq_len=128), full_attention=True, d_state=4, chunk_size=16).double()
    t = 45
    x = torch.randn(2, t, 32, dtype=torch.float64)
    full = m(x, SeqMeta())
    assert rel_rms_error(full, m.reference(x, SeqMeta())) < 1e-12
    cache, outs, start = m.init_cache(), [], 0
    cuts = sorted(random.Random(0).sample(range(1, t), 5)) + [t]
    for end in cuts:
        outs.append(m(x[:, start:end], SeqMeta(start=start), cache))
        start = end
    assert rel_rms_error(torch.cat(outs, 1), full) < 1e-12
    assert cache.nbytes() == m.state_bytes(t, 2, 8)  # grows with the context: full KV + O(1) SSM
    assert m.max_context() == 128
