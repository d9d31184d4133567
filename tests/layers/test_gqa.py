"""GQA / MQA modules equal MHA whose K/V heads are repeated copies of the shared ones."""

import pytest
import torch

from speedlm.layers.attention import Attention
from speedlm.layers.dims import ModelDims
from speedlm.layers.mixer import SeqMeta
from speedlm.ops.metrics import rel_rms_error

DIMS = ModelDims(d_model=32, n_heads=4)


@pytest.mark.parametrize("kv_heads", [1, 2], ids=["mqa", "gqa"])
def test_grouped_module_equals_mha_with_repeated_kv_weights(kv_heads):
    grouped = Attention(DIMS, kv_heads=kv_heads).double()
    mha = Attention(DIMS, kv_heads=4).double()
    dh, groups = DIMS.head_dim, 4 // kv_heads
    with torch.no_grad():
        mha.q_proj.weight.copy_(grouped.q_proj.weight)
        mha.o_proj.weight.copy_(grouped.o_proj.weight)
        for name in ("k_proj", "v_proj"):
            w = getattr(grouped, name).weight.view(kv_heads, dh, -1)
            getattr(mha, name).weight.copy_(w.repeat_interleave(groups, dim=0).reshape(4 * dh, -1))
    x = torch.randn(2, 41, 32, dtype=torch.float64)
    assert rel_rms_error(grouped(x, SeqMeta()), mha(x, SeqMeta())) < 1e-13


def test_kv_heads_equal_heads_is_mha():
    default = Attention(DIMS)
    assert default.kv_heads == 4 and default.k_proj.out_features == 32


def test_gqa_cache_is_smaller_by_the_group_factor():
    assert Attention(DIMS, kv_heads=1).state_bytes(100) * 4 == Attention(DIMS).state_bytes(100)
