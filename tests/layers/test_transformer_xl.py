"""Transformer-XL (layers/transformer_xl.py, ops/relative_attention.py): segment memory by the
paper's rule, relative positions with u and v, and the segment-mode cache."""

import pytest
import torch

from speedlm.errors import SpeedlmError
from speedlm.layers.dims import ModelDims
from speedlm.layers.mixer import SeqMeta
from speedlm.layers.transformer_xl import TransformerXLAttention
from speedlm.models import build_model
from speedlm.ops.metrics import rel_rms_error

DIMS = ModelDims(d_model=32, n_heads=4, max_seq_len=256, n_layers=2)


def make(**options):
    torch.manual_seed(1)
    return TransformerXLAttention(DIMS, **options).double()


def x_of(t, b=2):
    return torch.randn(b, t, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(t))


def test_two_segments_with_enough_memory_equal_one_pass_with_the_same_relative_attention():
    seg = make(mem_len=16, segment=16)
    whole = make(mem_len=64, segment=64)  # one segment holds both: plain causal relative attention
    whole.load_state_dict(seg.state_dict())
    x = x_of(32)
    cache = seg.init_cache()
    first = seg(x[:, :16], SeqMeta(0), cache)
    cache.detach()
    assert cache.length == 16  # the memory: the previous segment's 16 positions
    second = seg(x[:, 16:], SeqMeta(16), cache)
    one_pass = whole(x, SeqMeta())
    assert rel_rms_error(torch.cat([first, second], 1), one_pass) < 1e-12
    assert rel_rms_error(one_pass, whole.reference(x, SeqMeta())) < 1e-12


def test_a_query_sees_its_segment_and_the_memory_before_it_and_nothing_older():
    m, x = make(mem_len=5, segment=8), x_of(40)
    y = m(x, SeqMeta())
    # query 27 is in the segment starting at 24: it sees positions 19..27
    for pos, seen in ((18, False), (19, True), (27, True), (28, False)):
        x2 = x.clone()
        x2[:, pos] += 1.0
        changed = not torch.equal(m(x2, SeqMeta())[:, 27], y[:, 27])
        assert changed == seen, pos
    assert m.reach() == 12


def test_positions_are_relative_and_both_biases_act():
    m, x = make(mem_len=4, segment=16), x_of(16)
    at0 = m(x, SeqMeta(0))
    # a fresh segment further on (no memory in the cache): the same output, only distances matter
    assert rel_rms_error(m(x, SeqMeta(32), m.init_cache()), at0) < 1e-12
    for name in ("u", "v_bias", "r_proj"):
        m2 = make(mem_len=4, segment=16)
        with torch.no_grad():
            p = getattr(m2, name)
            (p.weight if name == "r_proj" else p).mul_(5.0)
        assert rel_rms_error(m2(x, SeqMeta()), at0) > 1e-4, name


@torch.no_grad()
def test_the_cache_is_the_segment_memory_and_stays_bounded():
    m, x = make(mem_len=6, segment=8), x_of(100, b=1)
    full = m(x, SeqMeta())
    cache = m.init_cache()
    steps = [m(x[:, i : i + 1], SeqMeta(i), cache) for i in range(100)]
    assert rel_rms_error(torch.cat(steps, 1), full) < 1e-12
    assert cache.length == 6 + 100 % 8  # the memory plus the current segment so far
    assert m.max_context() is None
    with pytest.raises(SpeedlmError, match="takes no KV policy"):
        from speedlm.cache.kv import WindowPolicy

        m.init_cache(WindowPolicy(4))


def test_model_context_reach_is_memory_times_layers():
    model = build_model("transformer-xl-tiny")
    mixer = model.blocks[0].mixer
    assert model.context_reach() == model.config.n_layers * mixer.reach()
    assert build_model("transformer-tiny").context_reach() is None  # full attention: the whole context
