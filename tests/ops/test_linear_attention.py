"""Chunked linear attention vs the recurrent float64 reference: outputs, final states, gradients."""

import pytest
import torch

from speedlm.ops.linear_attention import elu_feature_map, linear_attention_chunked, linear_attention_recurrent
from speedlm.ops.metrics import rel_rms_error


def _inputs(t, dtype=torch.float64, grad=False):
    g = torch.Generator().manual_seed(t)
    q = elu_feature_map(torch.randn(2, 3, t, 8, generator=g, dtype=dtype))
    k = elu_feature_map(torch.randn(2, 3, t, 8, generator=g, dtype=dtype))
    v = torch.randn(2, 3, t, 6, generator=g, dtype=dtype)
    s0 = (torch.rand(2, 3, 8, 6, generator=g, dtype=dtype), torch.rand(2, 3, 8, generator=g, dtype=dtype))
    return [x.requires_grad_(grad) for x in (q, k, v)], s0


@pytest.mark.parametrize("t", [1, 15, 63, 75, 130])
@pytest.mark.parametrize("normalize", [True, False])
def test_chunked_equals_recurrent_with_initial_state(t, normalize):
    (q, k, v), s0 = _inputs(t)
    ref, (s_ref, z_ref) = linear_attention_recurrent(q, k, v, s0, normalize)
    out, (s, z) = linear_attention_chunked(q, k, v, s0, normalize, chunk_size=16)
    assert rel_rms_error(out, ref) < 1e-12
    assert rel_rms_error(s, s_ref) < 1e-12 and rel_rms_error(z, z_ref) < 1e-12
    out32, _ = linear_attention_chunked(q.float(), k.float(), v.float(), tuple(x.float() for x in s0), normalize, chunk_size=16)
    assert rel_rms_error(out32, ref) < 1e-5


def test_chunked_gradients_equal_recurrent():
    (q, k, v), s0 = _inputs(45, grad=True)
    g = torch.randn(2, 3, 45, 6, dtype=torch.float64)
    a = torch.autograd.grad((linear_attention_chunked(q, k, v, s0, chunk_size=16)[0] * g).sum(), (q, k, v))
    b = torch.autograd.grad((linear_attention_recurrent(q, k, v, s0)[0] * g).sum(), (q, k, v))
    for x, y in zip(a, b):
        assert torch.isfinite(x).all()
        assert rel_rms_error(x, y) < 1e-11


def test_two_halves_with_carried_state_equal_whole():
    (q, k, v), _ = _inputs(77)
    whole, s_whole = linear_attention_chunked(q, k, v, chunk_size=16)
    a, s_a = linear_attention_chunked(q[:, :, :30], k[:, :, :30], v[:, :, :30], chunk_size=16)
    b, s_b = linear_attention_chunked(q[:, :, 30:], k[:, :, 30:], v[:, :, 30:], s_a, chunk_size=16)
    assert rel_rms_error(torch.cat([a, b], 2), whole) < 1e-12
    assert rel_rms_error(s_b[0], s_whole[0]) < 1e-12
