"""Mixture-of-heads attention (layers/moh.py, ops/routed_heads.py): the routed op equals dense
causal attention read at the selected tokens (values and gradients, any block, padding), the
layer's routing (shared heads always, top_k routed, gates summing to one), its balance loss,
its FLOPs following the active heads, and its option checks."""

import pytest
import torch

from speedlm.errors import SpeedlmError
from speedlm.layers.context import AuxLosses
from speedlm.layers.dims import ModelDims
from speedlm.layers.mixer import SeqMeta
from speedlm.layers.moh import MixtureOfHeadsAttention
from speedlm.models.config import ModelConfig
from speedlm.ops.attention import attention_reference, causal_mask
from speedlm.ops.metrics import rel_rms_error
from speedlm.ops.routed_heads import routed_head_attention

DIMS = ModelDims(d_model=32, n_heads=4, max_seq_len=128)


@pytest.mark.parametrize("block", [1, 4, 64])
@pytest.mark.parametrize("t", [1, 29])
def test_routed_heads_equal_dense_attention_at_the_selected_tokens(t, block):
    g = torch.Generator().manual_seed(t)
    q, k, v = (torch.randn(2, 3, t, 8, dtype=torch.float64, generator=g).requires_grad_() for _ in range(3))
    sel = torch.rand(2, 3, t, generator=g) < 0.4
    sel[1, 2] = False  # a head no token of a row uses
    out = routed_head_attention(q, k, v, sel, block=block)
    dense = attention_reference(q, k, v, causal_mask(t, t)) * sel[..., None]
    assert rel_rms_error(out, dense) < 1e-12 if sel.any() else out.abs().max() == 0
    w = torch.randn_like(dense)
    for a, b in zip(torch.autograd.grad((out * w).sum(), (q, k, v)), torch.autograd.grad((dense * w).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_each_token_uses_the_shared_heads_and_top_k_routed_ones():
    torch.manual_seed(0)
    m = MixtureOfHeadsAttention(ModelDims(d_model=64, n_heads=8, max_seq_len=64), shared=2, top_k=3)
    gates, _, _ = m._route(torch.randn(2, 11, 64))  # (B, H, T)
    assert (gates[:, :2] > 0).all()  # shared heads: always on
    assert ((gates[:, 2:] > 0).sum(1) == 3).all()  # exactly top_k of the 6 routed heads
    # the shared heads share a_1, the routed ones a_2 times their (not renormalised) top-k probabilities
    assert (gates.sum(1) < 1).all() and (gates.sum(1) > gates[:, :2].sum(1)).all()


def test_the_balance_loss_is_one_for_a_uniform_router_and_reported():
    m = MixtureOfHeadsAttention(DIMS, shared=1, top_k=1, balance_coef=0.5)
    with torch.no_grad():
        m.router.weight.zero_()
    aux = AuxLosses()
    m(torch.randn(2, 12, 32), SeqMeta(aux=aux))
    # uniform probabilities (1/3 each): E * sum_e share_e * 1/3 = 1 whatever the (tied) choices
    assert aux.parts["moh_balance"].item() == pytest.approx(0.5)


def test_attention_flops_follow_the_active_heads():
    m = MixtureOfHeadsAttention(ModelDims(d_model=64, n_heads=8, max_seq_len=64), shared=2, top_k=2)
    full = MixtureOfHeadsAttention(ModelDims(d_model=64, n_heads=8, max_seq_len=64), shared=2, top_k=6)
    assert m.flops_breakdown(1024).matmul / full.flops_breakdown(1024).matmul == pytest.approx(4 / 8)


def _config(**mixer):
    return ModelConfig(d_model=32, n_layers=1, n_heads=4, vocab_size=64, max_seq_len=64, pattern="M",
                       layers={"M": {"mixer": {"name": "moh", **mixer}}})


@pytest.mark.parametrize("mixer,message", [
    ({"shared": 4}, "shared=4 leaves no routed heads of n_heads=4"),
    ({"shared": 1, "top_k": 4}, "top_k=4 is more than the 3 routed heads"),
])
def test_impossible_head_splits_are_config_errors(mixer, message):
    with pytest.raises(SpeedlmError, match=message):
        _config(**mixer).validate()


def test_a_single_head_is_shared_plain_attention():
    # MQAR's probe models have one head: nothing to route, the head is always on with gate 1
    from speedlm.layers.attention import Attention

    dims = ModelDims(d_model=32, n_heads=1, max_seq_len=64)
    torch.manual_seed(0)
    m = MixtureOfHeadsAttention(dims).double()
    assert (m.shared, m.routed, m.top_k) == (1, 0, 0)
    attn = Attention(dims).double()
    attn.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("router")})
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    assert rel_rms_error(m(x, SeqMeta()), attn(x, SeqMeta())) < 1e-12
