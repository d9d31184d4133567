"""SDPA attention (MHA / GQA / MQA, prefill and chunked-prefill masks) vs the explicit softmax."""

import pytest
import torch

from speedlm.ops.attention import attention_reference, causal_mask, causal_sdpa, repeat_kv
from speedlm.ops.metrics import rel_rms_error


def _qkv(b, h, hkv, tq, tk, dh, dtype):
    return (torch.randn(b, h, tq, dh, dtype=dtype), torch.randn(b, hkv, tk, dh, dtype=dtype), torch.randn(b, hkv, tk, dh, dtype=dtype))


@pytest.mark.parametrize("hkv", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("tq,tk", [(37, 37), (1, 53), (11, 53)], ids=["prefill", "decode", "chunked"])
def test_causal_sdpa_matches_dense_softmax_reference(hkv, tq, tk):
    q, k, v = _qkv(2, 4, hkv, tq, tk, 16, torch.float64)
    ref = attention_reference(q, k, v, causal_mask(tq, tk))
    assert rel_rms_error(causal_sdpa(q, k, v), ref) < 1e-12
    q32, k32, v32 = q.float(), k.float(), v.float()
    assert rel_rms_error(causal_sdpa(q32, k32, v32), ref) < 1e-5


@pytest.mark.parametrize("hkv", [2, 1], ids=["gqa", "mqa"])
def test_gqa_equals_mha_on_repeated_kv(hkv):
    q, k, v = _qkv(2, 4, hkv, 29, 29, 8, torch.float64)
    grouped = causal_sdpa(q, k, v)
    repeated = causal_sdpa(q, repeat_kv(k, 4 // hkv), repeat_kv(v, 4 // hkv))
    assert rel_rms_error(grouped, repeated) < 1e-13


def test_reference_zeroes_fully_masked_rows():
    q, k, v = _qkv(1, 1, 1, 3, 3, 4, torch.float64)
    mask = torch.tensor([[False, False, False], [True, False, False], [True, True, True]])
    out = attention_reference(q, k, v, mask)
    assert torch.all(out[:, :, 0] == 0)
    assert torch.allclose(out[:, :, 1], v[:, :, 0])
