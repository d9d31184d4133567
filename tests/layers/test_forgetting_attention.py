"""The FoX mixer (layers/forgetting_attention.py): open gates make it attention without
positions on the same weights; its cache keeps the gates' sums in float64 and every key, and a
lossy KV policy is a one-line refusal."""

import pytest
import torch

from speedlm.cache.kv import WindowPolicy
from speedlm.errors import SpeedlmError
from speedlm.layers.attention import Attention
from speedlm.layers.dims import ModelDims
from speedlm.layers.forgetting_attention import ForgettingAttention
from speedlm.layers.mixer import SeqMeta
from speedlm.ops.metrics import rel_rms_error

DIMS = ModelDims(d_model=32, n_heads=4, max_seq_len=128)


def test_open_gates_are_attention_without_positions_on_the_same_weights():
    torch.manual_seed(0)
    fox = ForgettingAttention(DIMS, kv_heads=2).double()
    with torch.no_grad():
        fox.f_proj.weight.zero_()
        fox.f_proj.bias.fill_(60.0)  # sigmoid(60) = 1 - 9e-27: nothing is forgotten
    attn = Attention(DIMS, kv_heads=2, positions="none").double()
    attn.load_state_dict({k: v for k, v in fox.state_dict().items() if not k.startswith("f_proj")})
    x = torch.randn(2, 29, 32, dtype=torch.float64)
    assert rel_rms_error(fox(x, SeqMeta()), attn(x, SeqMeta())) < 1e-12


def test_the_gates_shorten_what_a_query_reads():
    # closed gates (f -> 0) leave each query its own key: the output is the own value's projection
    torch.manual_seed(0)
    fox = ForgettingAttention(DIMS).double()
    with torch.no_grad():
        fox.f_proj.weight.zero_()
        fox.f_proj.bias.fill_(-60.0)
    x = torch.randn(1, 9, 32, dtype=torch.float64)
    assert rel_rms_error(fox(x, SeqMeta()), fox.o_proj(fox.v_proj(x))) < 1e-12


def test_the_cache_holds_float64_gate_sums_and_continues_them():
    torch.manual_seed(0)
    fox = ForgettingAttention(DIMS)
    x = torch.randn(1, 12, 32)
    cache = fox.init_cache()
    fox(x[:, :7], SeqMeta(), cache)
    fox(x[:, 7:], SeqMeta(start=7), cache)
    k, v, c = cache.entries()
    assert c.dtype == torch.float64 and c.shape == (1, 4, 12, 1)
    expected = torch.nn.functional.logsigmoid(fox.f_proj(x).double()).transpose(1, 2).cumsum(-1)
    torch.testing.assert_close(c[..., 0], expected, rtol=1e-12, atol=1e-12)
    assert fox.state_bytes(1000, bytes_per_elem=2) == 2 * 4 * 8 * 1000 * 2 + 4 * 1000 * 8


def test_a_lossy_kv_policy_is_refused_in_one_line():
    with pytest.raises(SpeedlmError, match="forgetting_attention keeps every key.*WindowPolicy"):
        ForgettingAttention(DIMS).init_cache(WindowPolicy(16))
