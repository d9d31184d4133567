"""Linformer (layers/linformer.py): with k = T and identity projections it is full
bidirectional attention; projections shorten the keys to k rows; bad lengths are one line."""

import pytest
import torch

from speedlm.errors import SpeedlmError
from speedlm.layers.attention import Attention
from speedlm.layers.dims import ModelDims
from speedlm.layers.linformer import Linformer
from speedlm.layers.mixer import SeqMeta
from speedlm.models import ModelConfig
from speedlm.ops.metrics import rel_rms_error

DIMS = ModelDims(d_model=32, n_heads=4, max_seq_len=40)


def x_of(t):
    return torch.randn(2, t, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(t))


@pytest.mark.parametrize("sharing", ["none", "headwise", "kv"])
def test_k_equal_to_t_with_identity_projections_is_full_bidirectional_attention(sharing):
    torch.manual_seed(0)
    lin = Linformer(DIMS, k=40, sharing=sharing, kv_heads=2).double()
    full = Attention(DIMS, kv_heads=2).double()
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        getattr(full, name).weight.data.copy_(getattr(lin, name).weight.data)
    with torch.no_grad():
        for p in (lin.e_proj, lin.f_proj):
            if p is not None:
                p.copy_(torch.eye(40, dtype=torch.float64).expand_as(p))
    x, meta = x_of(40), SeqMeta(causal=False)
    assert rel_rms_error(lin(x, meta), full(x, meta)) < 1e-12
    assert rel_rms_error(lin.reference(x, meta), full(x, meta)) < 1e-12


def test_keys_are_projected_to_k_rows_and_lengths_are_checked():
    torch.manual_seed(0)
    lin = Linformer(DIMS, k=8).double()
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = lambda q, k, v, **kw: calls.append(k.shape) or real(q, k, v, **kw)
    try:
        lin(x_of(33), SeqMeta(causal=False))
    finally:
        torch.nn.functional.scaled_dot_product_attention = real
    assert calls == [torch.Size([2, 4, 8, 8])]  # 33 keys became 8 rows
    with pytest.raises(SpeedlmError, match="k=8 is larger than the sequence"):
        lin(x_of(5), SeqMeta(causal=False))
    with pytest.raises(SpeedlmError, match="longer than its projections allow"):
        lin(x_of(41), SeqMeta(causal=False))
    with pytest.raises(SpeedlmError, match="bidirectional-only"):
        lin(x_of(33), SeqMeta())
    with pytest.raises(SpeedlmError, match="larger than max_seq_len"):
        ModelConfig(objective="classify", num_classes=2, max_seq_len=16,
                    layers={"A": {"mixer": {"name": "linformer", "k": 32}}}).validate()
    with pytest.raises(SpeedlmError, match="bidirectional-only and cannot be used in a causal"):
        ModelConfig(layers={"A": {"mixer": {"name": "linformer", "k": 8}}}).validate()
