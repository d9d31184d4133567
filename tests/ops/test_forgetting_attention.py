"""Forgetting attention's fused form (ops/forgetting_attention.py) against the dense reference
with the (T, T) bias: values and gradients (the gates' included), odd lengths, every block size,
queries that are the last of the keys (chunked prefill, decoding), GQA, and float32 precision
when the cumulative gates run to hundreds of nats."""

import pytest
import torch
import torch.nn.functional as F

from speedlm.ops.forgetting_attention import forgetting_attention, forgetting_attention_reference
from speedlm.ops.metrics import rel_rms_error


def _inputs(t, heads=4, kv_heads=2, d=8, dtype=torch.float64, sharp=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, t, d, generator=g, dtype=dtype)
    k = torch.randn(2, kv_heads, t, d, generator=g, dtype=dtype)
    v = torch.randn(2, kv_heads, t, d, generator=g, dtype=dtype)
    logits = torch.randn(2, heads, t, generator=g, dtype=torch.float64) * sharp
    return q, k, v, logits


@pytest.mark.parametrize("block", [1, 5, 16, 256])
@pytest.mark.parametrize("t", [1, 37, 75])
def test_fused_equals_the_dense_bias_with_gradients(t, block):
    q, k, v, logits = _inputs(t)
    for x in (q, k, v, logits):
        x.requires_grad_(True)
    c = F.logsigmoid(logits).cumsum(-1)
    out = forgetting_attention(q, k, v, c, c, block_size=block)
    ref = forgetting_attention_reference(q, k, v, c, c)
    assert rel_rms_error(out, ref) < 1e-12
    w = torch.randn_like(ref)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v, logits), retain_graph=True)
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v, logits))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)  # a 1-token call's gate gradient is 0


@pytest.mark.parametrize("tq", [1, 6])
def test_queries_that_are_the_last_keys_see_every_earlier_key(tq):
    q, k, v, logits = _inputs(41)
    c = F.logsigmoid(logits).cumsum(-1)
    full = forgetting_attention_reference(q, k, v, c, c)
    out = forgetting_attention(q[:, :, -tq:], k, v, c[..., -tq:], c, block_size=4)
    assert rel_rms_error(out, full[:, :, -tq:]) < 1e-12


def test_open_gates_are_plain_causal_attention():
    q, k, v, _ = _inputs(33, kv_heads=4)
    c = torch.zeros(2, 4, 33, dtype=torch.float64)
    plain = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert rel_rms_error(forgetting_attention(q, k, v, c, c, block_size=8), plain) < 1e-12


def test_float32_is_as_exact_as_the_dense_bias_when_the_gates_sum_to_thousands_of_nats():
    # per-block rebasing keeps the extra key channel small where the weights are; one offset for
    # the whole sequence (a single block) adds |c_T| to the logits and rounds them in float32
    q, k, v, logits = _inputs(2048, d=16, sharp=1.0)
    c = F.logsigmoid(logits - 1.0).cumsum(-1)
    assert c[..., -1].abs().min() > 2000
    ref = forgetting_attention_reference(q, k, v, c, c)
    dense32 = rel_rms_error(forgetting_attention_reference(q.float(), k.float(), v.float(), c.float(), c.float()).double(), ref)
    out = forgetting_attention(q.float(), k.float(), v.float(), c, c)
    assert out.dtype == torch.float32
    assert rel_rms_error(out.double(), ref) < dense32
    one_offset = forgetting_attention(q.float(), k.float(), v.float(), c, c, block_size=2048)
    assert rel_rms_error(one_offset.double(), ref) > dense32
