"""LogSparse (ops/logsparse_attention.py): the distance-walking plan equals attention under the
dense mask, for the local and restart variants, offsets (cached keys), both directions and GQA,
with gradients; and a query reads O(local + log T) keys."""

import pytest
import torch

from speedlm.ops.attention import attention, attention_reference
from speedlm.ops.logsparse_attention import LogSparse
from speedlm.ops.masks import AttentionMask


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


CASES = [(True, 37, 37, 0, 1, None), (True, 19, 60, 0, 3, None), (True, 53, 53, 7, 4, 16), (True, 1, 30, 0, 1, None),
         (False, 37, 37, 0, 2, None), (False, 41, 41, 3, 1, 8)]  # bidirectional: no cache


@pytest.mark.parametrize("tile", [512, 8])  # one tile, and query tiles that split every case
@pytest.mark.parametrize("causal, tq, tk, offset, local, restart", CASES)
def test_distance_plan_equals_the_dense_mask(causal, tq, tk, offset, local, restart, tile, monkeypatch):
    from speedlm.ops import logsparse_attention

    monkeypatch.setattr(logsparse_attention, "TILE", tile)
    g = torch.Generator().manual_seed(tq + tk)
    q = torch.randn(2, 4, tq, 8, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(2, 2, tk, 8, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(2, 2, tk, 8, dtype=torch.float64, generator=g, requires_grad=True)
    mask = AttentionMask(LogSparse(local, restart), tq, tk, offset + tk - tq, offset, causal)
    out = LogSparse(local, restart).plan(q, k, v, mask)
    ref = attention_reference(q, k, v, mask.dense())
    assert rel(out, ref) < 1e-12 and rel(attention(q, k, v, mask), ref) < 1e-12
    grads = torch.autograd.grad(out.square().sum(), [q, k, v])
    ref_grads = torch.autograd.grad(ref.square().sum(), [q, k, v])
    assert all(rel(a, b) < 1e-12 for a, b in zip(grads, ref_grads))


def test_a_query_reads_local_plus_log_t_keys():
    t = 4096
    dense = AttentionMask(LogSparse(4), 1, t, t - 1, 0, True).dense()  # the last query's keys
    assert int(dense.sum()) == len(LogSparse(4).distances(t)) == 4 + 10  # 0..3, then 4, 8, ..., 2048
    assert LogSparse(1, restart=100).distances(100) == [0, 1, 2, 4, 8, 16, 32, 64]
