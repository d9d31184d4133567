"""The dilated window (ops/dilated_attention.py): the residue-class plan equals attention under
the dense mask and the generic sparse path, for offsets, odd lengths, both directions, GQA,
with gradients; and it touches window keys per query, not window * dilation."""

import pytest
import torch

from speedlm.ops import attention as attention_ops
from speedlm.ops.attention import attention, attention_reference
from speedlm.ops.dilated_attention import DilatedWindow
from speedlm.ops.masks import AttentionMask
from speedlm.ops.sparse_attention import block_sparse_attention


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


CASES = [(True, 37, 37, 0, 3, 5), (True, 19, 60, 0, 4, 6), (True, 53, 53, 7, 2, 9), (True, 5, 41, 3, 5, 3),
         (True, 29, 29, 0, 1, 4), (False, 37, 37, 0, 3, 5), (False, 53, 53, 7, 2, 9)]  # bidirectional: no cache


@pytest.mark.parametrize("causal, tq, tk, offset, dilation, window", CASES)
def test_residue_plan_equals_the_dense_mask_and_the_generic_path(causal, tq, tk, offset, dilation, window):
    g = torch.Generator().manual_seed(tq + tk)
    q = torch.randn(2, 4, tq, 8, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(2, 2, tk, 8, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(2, 2, tk, 8, dtype=torch.float64, generator=g, requires_grad=True)
    start = offset + tk - tq  # queries are the last tq keys
    mask = AttentionMask(DilatedWindow(window, dilation), tq, tk, start, offset, causal)
    out = attention(q, k, v, mask)
    ref = attention_reference(q, k, v, mask.dense())
    generic = block_sparse_attention(q, k, v, mask, block=16)
    assert rel(out, ref) < 1e-12 and rel(generic, ref) < 1e-12
    grads = torch.autograd.grad(out.square().sum(), [q, k, v])
    ref_grads = torch.autograd.grad(ref.square().sum(), [q, k, v])
    assert all(rel(a, b) < 1e-12 for a, b in zip(grads, ref_grads))


def test_the_plan_reads_window_keys_per_query(monkeypatch):
    seen = []
    real = attention_ops.sparse_attention

    def spy(q, k, v, mask, scale=None, backend="auto"):
        seen.append((mask.pattern, q.shape[-2], k.shape[-2]))
        return real(q, k, v, mask, scale, backend)

    monkeypatch.setattr(attention_ops, "sparse_attention", spy)
    t, d, w = 400, 8, 10
    q = torch.randn(1, 2, t, 8)
    mask = AttentionMask(DilatedWindow(w, d), t, t, 0, 0, True)
    attention(q, q, q, mask)
    assert len(seen) == d and all(p.window == w and tq == tk == t // d for p, tq, tk in seen)  # d windows of w


def test_the_layer_runs_the_plan_in_training_prefill_and_per_head_groups(monkeypatch):
    from speedlm.layers.dims import ModelDims
    from speedlm.layers.mixer import SeqMeta
    from speedlm.layers.sparse_attention import DilatedWindowAttention
    from speedlm.ops import dilated_attention

    calls = []
    real = dilated_attention.dilated_window_attention
    monkeypatch.setattr(dilated_attention, "dilated_window_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    dims = ModelDims(d_model=32, n_heads=4, max_seq_len=128, n_layers=2)
    for dilation in (2, [1, 1, 3, 3]):
        m = DilatedWindowAttention(dims, window=4, dilation=dilation, kv_heads=2).double()
        x = torch.randn(2, 40, 32, dtype=torch.float64)
        calls.clear()
        y = m(x, SeqMeta())  # the mixer's own window policy is wider than the reach: the plan runs
        assert len(calls) == (1 if dilation == 2 else 2)
        assert rel(y, m.reference(x, SeqMeta())) < 1e-12
