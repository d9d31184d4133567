"""Longformer (layers/longformer.py): global tokens by rule or by position, their own
projections, the causal prefix rule, and equality with the dense reference."""

import pytest
import torch

from speedlm.errors import SpeedlmError
from speedlm.layers.dims import ModelDims
from speedlm.layers.longformer import LongformerAttention
from speedlm.layers.mixer import SeqMeta
from speedlm.models import ModelConfig
from speedlm.ops.metrics import rel_rms_error

DIMS = ModelDims(d_model=32, n_heads=4, max_seq_len=128, n_layers=2)


def make(**options):
    torch.manual_seed(1)
    return LongformerAttention(DIMS, **options).double()


def x_of(t):
    return torch.randn(2, t, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(t))


def test_bidirectional_global_positions_see_everything_with_their_own_projections():
    m, x = make(window=4, global_tokens=[3, 17]), x_of(30)
    meta = SeqMeta(causal=False)
    y = m(x, meta)
    assert rel_rms_error(y, m.reference(x, meta)) < 1e-12
    with torch.no_grad():
        m.q_global.weight.mul_(3.0)  # only the global rows use the global projections
    changed = (m(x, meta) - y).abs().amax(dim=(0, 2)) > 0
    assert changed.nonzero()[:, 0].tolist() == [3, 17]
    x2 = x.clone()
    x2[:, 25] += 1.0  # far outside every window: only the global rows (and 25's own window) see it
    far = (m(x2, meta) - m(x, meta)).abs().amax(dim=(0, 2)) > 0
    assert far[[3, 17]].all() and not far[5:14].any()


def test_causal_decoding_through_the_prefix_and_past_it():
    m, x = make(window=5, global_tokens=3), x_of(40)
    full = m(x, SeqMeta())
    assert rel_rms_error(full, m.reference(x, SeqMeta())) < 1e-12
    with torch.no_grad():
        cache = m.init_cache()
        steps = [m(x[:, :2], SeqMeta(0), cache)] + [m(x[:, i : i + 1], SeqMeta(i), cache) for i in range(2, 40)]
    assert rel_rms_error(torch.cat(steps, 1), full) < 1e-12
    assert cache["kv"].length == 3 + 4 and cache["global_kv"].length == 3  # the prefix and the window, no more


def test_only_a_global_prefix_is_valid_in_a_causal_model():
    spec = {"name": "longformer", "window": 8, "global_tokens": [0, 5]}
    with pytest.raises(SpeedlmError, match="only a global prefix is valid"):
        ModelConfig(layers={"A": {"mixer": spec}}).validate()
    ModelConfig(layers={"A": {"mixer": {**spec, "global_tokens": [0, 1, 2]}}}).validate()  # a prefix: fine


def test_causal_local_rows_run_banded_in_training_and_from_the_trimmed_cache_when_decoding(monkeypatch):
    from speedlm.ops import longformer

    banded = []
    real = longformer.banded_prefix_attention
    monkeypatch.setattr(longformer, "banded_prefix_attention", lambda *a, **k: banded.append(a[3:5]) or real(*a, **k))
    m, x = make(window=5, global_tokens=3), x_of(300)
    y = m(x, SeqMeta())
    assert banded == [(5, 3)]
    assert rel_rms_error(y, m.reference(x, SeqMeta())) < 1e-12
    with torch.no_grad():  # the cache keeps the prefix and the window: non-contiguous keys, another plan
        cache = m.init_cache()
        m(x[:, :20], SeqMeta(0), cache)
        step = m(x[:, 20:21], SeqMeta(20), cache)
    assert len(banded) == 2 and rel_rms_error(step, y[:, 20:21]) < 1e-12


@pytest.mark.parametrize("tq,tk,window,g,block", [(37, 37, 5, 3, 8), (300, 300, 16, 4, 128), (9, 30, 7, 2, 4), (50, 50, 64, 8, 16)])
def test_banded_plan_equals_the_dense_mask(tq, tk, window, g, block):
    from speedlm.ops.attention import attention_reference
    from speedlm.ops.longformer import banded_prefix_attention

    gen = torch.Generator().manual_seed(tq + tk)
    q = torch.randn(2, 4, tq, 8, dtype=torch.float64, generator=gen)
    k, v = (torch.randn(2, 2, tk, 8, dtype=torch.float64, generator=gen) for _ in range(2))  # GQA
    i = torch.arange(tq)[:, None] + tk - tq
    j = torch.arange(tk)[None]
    allowed = (j <= i) & ((i - j < window) | (j < g))
    ref = attention_reference(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), allowed[None].expand(2, -1, -1))
    assert rel_rms_error(banded_prefix_attention(q, k, v, window, g, block=block), ref) < 1e-12
