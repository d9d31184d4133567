"""Mask-function sparse attention: the gathered-block backend and FlexAttention vs the dense
reference, at odd lengths and offsets, with gradients; per-row masks (positions, documents,
non-contiguous cached keys); memory that follows the pattern; and the backend dispatch."""

import pytest
import torch

from speedlm.ops.dispatch import is_compile_failure
from speedlm.ops.masks import AttentionMask, Full, SlidingWindow
from speedlm.ops.metrics import rel_rms_error
from speedlm.ops.sparse_attention import (
    SPARSE_ATTENTION,
    active_kv_blocks,
    block_sparse_attention,
    flex_sparse_attention,
    sparse_attention,
    sparse_attention_reference,
)

CASES = [  # tq, tk, q_start, kv_start, window, heads, kv_heads (queries are the last tq keys)
    (75, 75, 0, 0, 17, 4, 2),
    (200, 200, 0, 0, 64, 2, 2),
    (33, 50, 17, 0, 9, 4, 1),
    (130, 140, 10, 0, 300, 2, 1),
    (63, 63, 5, 5, 1, 2, 2),
    (5, 5, 0, 0, 3, 2, 2),
]


def _inputs(tq, tk, h, hkv, dtype, grad=False, b=2):
    g = torch.Generator().manual_seed(tq * 1000 + tk)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype).requires_grad_(grad)  # noqa: E731
    return mk(b, h, tq, 16), mk(b, hkv, tk, 16), mk(b, hkv, tk, 16)


def window(w, tq, tk, qs, ks, causal=True):
    return AttentionMask(SlidingWindow(w), tq, tk, qs, ks, causal)


@pytest.mark.parametrize("case", CASES)
def test_block_backend_matches_reference_float64_and_float32(case):
    tq, tk, qs, ks, w, h, hkv = case
    q, k, v = _inputs(tq, tk, h, hkv, torch.float64)
    mask = window(w, tq, tk, qs, ks)
    ref = sparse_attention_reference(q, k, v, mask)
    assert rel_rms_error(block_sparse_attention(q, k, v, mask), ref) < 1e-12
    out32 = block_sparse_attention(q.float(), k.float(), v.float(), mask)
    assert rel_rms_error(out32, ref) < 1e-5


def test_the_reference_mask_is_the_window_by_hand():
    m = window(3, 4, 6, 2, 0).dense()[0]
    expected = torch.tensor(
        [[1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1]], dtype=torch.bool
    )
    assert torch.equal(m, expected)
    # bidirectional: the band on both sides
    b = window(2, 4, 4, 0, 0, causal=False).dense()[0]
    assert torch.equal(b, (torch.arange(4)[:, None] - torch.arange(4)[None]).abs() < 2)


def test_block_backend_gradients_match_reference():
    q, k, v = _inputs(75, 75, 4, 2, torch.float64, grad=True)
    mask = window(13, 75, 75, 0, 0)
    g_out = torch.randn(2, 4, 75, 16, dtype=torch.float64)
    grads = torch.autograd.grad((block_sparse_attention(q, k, v, mask) * g_out).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((sparse_attention_reference(q, k, v, mask) * g_out).sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        assert torch.isfinite(a).all()
        assert rel_rms_error(a, b) < 1e-11


def test_rows_that_see_nothing_are_zero():
    q, k, v = _inputs(10, 10, 2, 2, torch.float64)
    mask = AttentionMask(lambda qp, kp: qp >= 5 + 0 * kp, 10, 10, 0, 0)
    out = block_sparse_attention(q, k, v, mask)
    assert torch.all(out[:, :, :5] == 0)
    assert rel_rms_error(out, sparse_attention_reference(q, k, v, mask)) < 1e-12


@pytest.mark.parametrize("tq", [1, 9, 70], ids=["decode", "chunk", "prefill"])
def test_per_row_positions_and_documents_get_per_row_plans(tq):
    """A mask that differs between rows (explicit positions, packed documents) is exact against
    the dense reference, including the single-token decode path."""
    tk = 70
    q, k, v = _inputs(tq, tk, 4, 2, torch.float64, b=3)
    k_pos = torch.stack([torch.arange(tk), torch.arange(tk) + 5, torch.arange(tk) * 2])  # row 2: gaps
    q_pos = k_pos[:, tk - tq :]
    doc = (torch.arange(tk)[None] >= torch.tensor([[0], [20], [45]])).long()  # a boundary per row
    mask = AttentionMask(SlidingWindow(11), tq, tk, q_pos, k_pos, True, doc[:, tk - tq :], doc)
    assert mask.batch == 3 and mask.plan_key is None
    dense = mask.dense()
    assert not torch.equal(dense[0], dense[2])  # row 2 sees fewer keys: its positions have gaps
    ref = sparse_attention_reference(q, k, v, mask)
    assert rel_rms_error(sparse_attention(q, k, v, mask), ref) < 1e-12


def test_window_touches_O_window_key_blocks_not_O_T():
    """The memory promise: gathered keys per query block do not grow with T."""
    for t in (1024, 4096):
        idx, valid = active_kv_blocks(window(128, t, t, 0, 0), 64, "cpu")
        assert idx.shape == (1, t // 64, 3)  # window 128 spans at most 3 blocks of 64
    idx, _ = active_kv_blocks(AttentionMask(Full(), 1024, 1024, 0, 0), 64, "cpu")
    assert idx.shape[2] == 16  # a dense causal pattern touches every earlier block


@pytest.mark.parametrize("tq,tk,q_start,kv_start", [(150, 150, 0, 0), (37, 90, 60, 7)], ids=["prefill", "chunk"])
def test_flex_backend_matches_reference_on_cpu_inference(tq, tk, q_start, kv_start):
    """Compiled FlexAttention consumes the same mask (CPU has no flex backward), including the
    offsets of a chunked prefill."""
    q, k, v = _inputs(tq, tk, 4, 2, torch.float32)
    mask = window(40, tq, tk, q_start, kv_start)
    ref = sparse_attention_reference(q.double(), k.double(), v.double(), mask)
    assert rel_rms_error(flex_sparse_attention(q, k, v, mask), ref) < 1e-5


def _broken(exc):
    calls = []

    def run(*args, **kwargs):
        calls.append(1)
        raise exc

    return run, calls


def _compile_error(backend, a, b):
    """The exception a real torch.compile raises for `a @ b` with this backend."""
    try:
        torch.compile(lambda x, y: x @ y, backend=backend, fullgraph=True)(a, b)
    except Exception as e:  # noqa: BLE001
        return e
    raise AssertionError("expected torch.compile to fail")


def _no_triton(gm, example_inputs):
    raise ImportError("No module named 'triton'")


def test_compile_failures_are_told_apart_from_bugs_seen_while_compiling():
    torch._dynamo.reset()
    ok = torch.ones(2, 3), torch.ones(3, 3)
    assert is_compile_failure(_compile_error(_no_triton, *ok))  # the backend cannot build
    assert is_compile_failure(_compile_error("no_such_backend", *ok))
    # a shape bug found while tracing is the caller's bug: no fallback may hide it
    bug = _compile_error("eager", torch.ones(2, 3), torch.ones(2, 3))
    assert not is_compile_failure(bug)
    assert not is_compile_failure(torch.OutOfMemoryError("CUDA out of memory"))
    torch._dynamo.reset()


def test_auto_falls_back_once_when_flex_cannot_compile(monkeypatch):
    import speedlm.ops.sparse_attention as sa

    failure = _compile_error(_no_triton, torch.ones(2, 3), torch.ones(3, 3))  # what a failed torch.compile raises
    torch._dynamo.reset()
    flex, calls = _broken(failure)
    monkeypatch.setattr(sa, "flex_sparse_attention", flex)
    monkeypatch.setitem(SPARSE_ATTENTION._impls, "flex", (SPARSE_ATTENTION._impls["flex"][0], lambda *a, **k: True))
    monkeypatch.setattr(SPARSE_ATTENTION, "failed", {})
    q, k, v = _inputs(40, 40, 2, 2, torch.float64)
    mask = window(9, 40, 40, 0, 0)
    with pytest.warns(UserWarning, match="cannot compile"):
        out = sparse_attention(q, k, v, mask)
    assert rel_rms_error(out, sparse_attention_reference(q, k, v, mask)) < 1e-12
    sparse_attention(q, k, v, mask)
    assert len(calls) == 1  # not retried on every call
    with pytest.raises(type(failure)):
        sparse_attention(q, k, v, mask, backend="flex")  # explicit: no fallback


@pytest.mark.parametrize(
    "make_exc",
    [
        lambda: torch.OutOfMemoryError("CUDA out of memory"),
        lambda: RuntimeError("shape mismatch"),
        lambda: _compile_error("eager", torch.ones(2, 3), torch.ones(2, 3)),  # a bug met while compiling
    ],
    ids=["oom", "bug", "bug-while-compiling"],
)
def test_auto_does_not_hide_runtime_errors_behind_a_fallback(monkeypatch, make_exc):
    import speedlm.ops.sparse_attention as sa

    exc = make_exc()
    torch._dynamo.reset()
    flex, calls = _broken(exc)
    monkeypatch.setattr(sa, "flex_sparse_attention", flex)
    monkeypatch.setitem(SPARSE_ATTENTION._impls, "flex", (SPARSE_ATTENTION._impls["flex"][0], lambda *a, **k: True))
    monkeypatch.setattr(SPARSE_ATTENTION, "failed", {})
    q, k, v = _inputs(40, 40, 2, 2, torch.float64)
    with pytest.raises(type(exc)):
        sparse_attention(q, k, v, window(9, 40, 40, 0, 0))
    assert SPARSE_ATTENTION.failed == {}  # flex stays the preferred backend
