"""HGRN2 (layers/hgrn2.py): the outer-product expansion of HGRN's recurrence, checked against
HGRN's own element-wise op, and its option checks."""

import pytest
import torch
import torch.nn.functional as F

from speedlm.errors import SpeedlmError
from speedlm.layers.dims import ModelDims
from speedlm.layers.hgrn2 import HGRN2
from speedlm.layers.mixer import SeqMeta
from speedlm.models.config import ModelConfig
from speedlm.ops.hgrn import hgrn_recurrent


def test_one_channel_heads_are_hgrns_recurrence_read_by_the_query():
    # with 1-channel heads the state is HGRN's vector h_t = f_t h_{t-1} + (1 - f_t) i_t and the
    # output reads it through the swish query: o_t = silu(q_t) * h_t (scale 1/sqrt(1))
    dims = ModelDims(d_model=8, n_heads=2, max_seq_len=64, layer_idx=1, n_layers=2)
    torch.manual_seed(0)
    m = HGRN2(dims, expand_ratio=1).double()
    x = torch.randn(2, 19, 8, dtype=torch.float64)
    q, f, i = m.q_proj(x), m.f_proj(x), m.i_proj(x)
    forget = 0.5 + 0.5 * torch.sigmoid(f)  # lower bound layer_idx / n_layers = 0.5
    h, _ = hgrn_recurrent((1 - forget) * i, torch.log(forget))
    o = F.silu(q) * h
    expected = m.o_proj(F.rms_norm(o, (8,), m.norm_weight, dims.norm_eps))
    torch.testing.assert_close(m(x, SeqMeta()), expected, rtol=1e-10, atol=1e-10)


def test_state_is_a_head_dim_square_per_head():
    dims = ModelDims(d_model=32, n_heads=4, max_seq_len=64)
    m = HGRN2(dims)
    assert (m.n_heads, m.head_dim) == (4, 8)
    assert m.state_bytes(10_000) == 4 * 8 * 8 * 4  # float32 state, independent of the context
    assert HGRN2(dims, expand_ratio=16).n_heads == 2


def test_an_expand_ratio_that_does_not_divide_the_width_is_a_config_error():
    cfg = dict(d_model=32, n_layers=1, n_heads=4, vocab_size=64, max_seq_len=64, pattern="H",
               layers={"H": {"mixer": {"name": "hgrn2", "expand_ratio": 5}}})
    with pytest.raises(SpeedlmError, match="expand_ratio=5 must divide d_model=32"):
        ModelConfig(**cfg).validate()
