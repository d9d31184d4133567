"""Mask-function sparse attention: the gathered-block backend and FlexAttention vs the dense
reference, at odd lengths and offsets, with gradients; and memory that follows the pattern."""

import pytest
import torch

from speedlm.ops.masks import Causal, SlidingWindow
from speedlm.ops.metrics import rel_rms_error
from speedlm.ops.sparse_attention import (
    active_kv_blocks,
    block_sparse_attention,
    flex_sparse_attention,
    sparse_attention_reference,
)

CASES = [  # tq, tk, q_start, kv_start, window, heads, kv_heads
    (75, 75, 0, 0, 17, 4, 2),
    (200, 200, 0, 0, 64, 2, 2),
    (33, 50, 17, 0, 9, 4, 1),
    (130, 140, 10, 0, 300, 2, 1),
    (63, 63, 5, 5, 1, 2, 2),
    (5, 5, 0, 0, 3, 2, 2),
]


def _inputs(tq, tk, h, hkv, dtype, grad=False):
    g = torch.Generator().manual_seed(tq * 1000 + tk)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype).requires_grad_(grad)  # noqa: E731
    return mk(2, h, tq, 16), mk(2, hkv, tk, 16), mk(2, hkv, tk, 16)


@pytest.mark.parametrize("case", CASES)
def test_block_backend_matches_reference_float64_and_float32(case):
    tq, tk, qs, ks, w, h, hkv = case
    q, k, v = _inputs(tq, tk, h, hkv, torch.float64)
    ref = sparse_attention_reference(q, k, v, SlidingWindow(w), qs, ks)
    assert rel_rms_error(block_sparse_attention(q, k, v, SlidingWindow(w), qs, ks), ref) < 1e-12
    out32 = block_sparse_attention(q.float(), k.float(), v.float(), SlidingWindow(w), qs, ks)
    assert rel_rms_error(out32, ref) < 1e-5


def test_block_backend_gradients_match_reference():
    q, k, v = _inputs(75, 75, 4, 2, torch.float64, grad=True)
    mask = SlidingWindow(13)
    g_out = torch.randn(2, 4, 75, 16, dtype=torch.float64)
    grads = torch.autograd.grad((block_sparse_attention(q, k, v, mask, 0, 0) * g_out).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((sparse_attention_reference(q, k, v, mask, 0, 0) * g_out).sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        assert torch.isfinite(a).all()
        assert rel_rms_error(a, b) < 1e-11


def test_rows_that_see_nothing_are_zero():
    q, k, v = _inputs(10, 10, 2, 2, torch.float64)
    nothing_before_5 = lambda qp, kp: (kp <= qp) & (qp >= 5)  # noqa: E731
    out = block_sparse_attention(q, k, v, nothing_before_5, 0, 0)
    assert torch.all(out[:, :, :5] == 0)
    assert rel_rms_error(out, sparse_attention_reference(q, k, v, nothing_before_5, 0, 0)) < 1e-12


def test_window_touches_O_window_key_blocks_not_O_T():
    """The memory promise: gathered keys per query block do not grow with T."""
    for t in (1024, 4096):
        idx, valid = active_kv_blocks(SlidingWindow(128), t, t, 0, 0, 64, "cpu")
        assert idx.shape == (t // 64, 3)  # window 128 spans at most 3 blocks of 64
    idx, _ = active_kv_blocks(Causal(), 1024, 1024, 0, 0, 64, "cpu")
    assert idx.shape[1] == 16  # a dense causal pattern touches every earlier block


@pytest.mark.parametrize("tq,tk,q_start,kv_start", [(150, 150, 0, 0), (37, 90, 60, 7)], ids=["prefill", "chunk"])
def test_flex_backend_matches_reference_on_cpu_inference(tq, tk, q_start, kv_start):
    """Compiled FlexAttention consumes the same mask function (CPU has no flex backward),
    including the offsets of a chunked prefill."""
    q, k, v = _inputs(tq, tk, 4, 2, torch.float32)
    ref = sparse_attention_reference(q.double(), k.double(), v.double(), SlidingWindow(40), q_start, kv_start)
    out = flex_sparse_attention(q, k, v, SlidingWindow(40), q_start, kv_start)
    assert rel_rms_error(out, ref) < 1e-5


def test_auto_falls_back_once_to_blocks_when_flex_cannot_compile(monkeypatch):
    import speedlm.ops.sparse_attention as sa

    calls = []

    def broken_flex(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("triton not found")

    monkeypatch.setattr(sa, "_prefers_flex", lambda q: True)
    monkeypatch.setattr(sa, "flex_sparse_attention", broken_flex)
    monkeypatch.setattr(sa, "_flex_failed", None)
    q, k, v = _inputs(40, 40, 2, 2, torch.float64)
    with pytest.warns(UserWarning, match="triton not found"):
        out = sa.sparse_attention(q, k, v, SlidingWindow(9), 0, 0)
    assert rel_rms_error(out, sparse_attention_reference(q, k, v, SlidingWindow(9), 0, 0)) < 1e-12
    sa.sparse_attention(q, k, v, SlidingWindow(9), 0, 0)
    assert len(calls) == 1  # not retried on every call
    with pytest.raises(RuntimeError, match="triton"):
        sa.sparse_attention(q, k, v, SlidingWindow(9), 0, 0, backend="flex")  # explicit: no fallback
