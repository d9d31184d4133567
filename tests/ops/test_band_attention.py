"""The band plan (ops/band_attention.py) == the dense float64 reference with gradients: causal and
both-sided windows, odd lengths, grouped-query heads, queries that are the last keys of a longer
cache (chunked prefill), block sizes that leave edge blocks and padding, a window wider than the
block; and the sparse dispatch's torch backend takes it for a band narrower than the keys."""

from __future__ import annotations

import pytest
import torch

from speedlm.ops import band_attention as band
from speedlm.ops.masks import AttentionMask, SlidingWindow
from speedlm.ops.metrics import rel_rms_error
from speedlm.ops.sparse_attention import _band_bounds, block_sparse_attention, sparse_attention_reference

CASES = {  # (heads, kv heads, Tq, Tk, window, causal, query start, key start)
    "causal": (4, 2, 37, 37, 8, True, 0, 0),
    "both sides": (4, 4, 50, 50, 5, False, 0, 0),
    "chunked prefill": (2, 1, 13, 40, 9, True, 27, 0),
    "window beyond the keys": (2, 2, 3, 3, 16, True, 0, 0),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("block", [None, 4, 7])
def test_band_plan_equals_the_float64_reference_with_gradients(case, block):
    h, hkv, tq, tk, w, causal, q0, k0 = CASES[case]
    g = torch.Generator().manual_seed(tq + w)
    q, k, v = (torch.randn(2, n, t, 16, dtype=torch.float64, generator=g).requires_grad_()
               for n, t in ((h, tq), (hkv, tk), (hkv, tk)))
    mask = AttentionMask(SlidingWindow(w), tq, tk, q0, k0, causal)
    out = band.band_attention(q, k, v, *_band_bounds(mask), block=block)
    ref = sparse_attention_reference(q, k.repeat_interleave(h // hkv, 1), v.repeat_interleave(h // hkv, 1), mask)
    assert rel_rms_error(out, ref) < 1e-12
    gy = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad((out * gy).sum(), (q, k, v)), torch.autograd.grad((ref * gy).sum(), (q, k, v))):
        assert rel_rms_error(a, b) < 1e-12


def test_the_torch_backend_takes_the_band_plan_for_a_window_narrower_than_the_keys(monkeypatch):
    calls = []
    real = band.band_attention
    monkeypatch.setattr("speedlm.ops.sparse_attention.band_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    q = torch.randn(1, 2, 40, 8)
    block_sparse_attention(q, q, q, AttentionMask(SlidingWindow(8), 40, 40, 0, 0, True))
    assert calls == [1]
    block_sparse_attention(q, q, q, AttentionMask(SlidingWindow(64), 40, 40, 0, 0, True))  # wider: the block plan
    assert calls == [1]


@pytest.mark.parametrize("width", [8, 32, 63, 128, 512])
def test_blocks_are_sized_for_the_excess(width):
    b = band.band_block(width)
    assert b >= band.MIN_BLOCK and (b + width - 1) / width <= max(band.MAX_EXCESS, (band.MIN_BLOCK + width - 1) / width)
