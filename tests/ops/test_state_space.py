"""Mamba's selective scan and Mamba-2's SSD: the chunked forms == the sequential references
(outputs, final states, gradients) for odd lengths and several chunk sizes, in float64 and
float32, with and without an initial state; SSD is invariant to its chunk size; two halves with
the carried state == the whole; large steps (delta A far below float32's exp range) stay exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from speedlm.ops.metrics import rel_rms_error
from speedlm.ops.selective_scan import selective_scan_chunked, selective_scan_recurrent
from speedlm.ops.ssd import ssd_as_gla, ssd_chunked, ssd_recurrent

BATCH, D, N = 2, 6, 5  # selective scan: channels, state size
H, G, P = 4, 2, 3  # SSD: heads, groups, head dim


def _randn(g, *shape):
    return torch.randn(*shape, dtype=torch.float64, generator=g)


def scan_inputs(t, g, dt_scale=1.0):
    return {
        "u": _randn(g, BATCH, t, D),
        "delta": F.softplus(_randn(g, BATCH, t, D) - 1.0) * dt_scale,
        "A": -torch.rand(D, N, dtype=torch.float64, generator=g) * 4 - 0.5,
        "B": _randn(g, BATCH, t, N),
        "C": _randn(g, BATCH, t, N),
    }


def ssd_inputs(t, g, dt_scale=1.0):
    return {
        "x": _randn(g, BATCH, t, H, P),
        "dt": F.softplus(_randn(g, BATCH, t, H) - 1.0) * dt_scale,
        "A": -torch.rand(H, dtype=torch.float64, generator=g) * 4 - 0.5,
        "B": _randn(g, BATCH, t, G, N),
        "C": _randn(g, BATCH, t, G, N),
    }


OPS = {
    "selective_scan": (scan_inputs, lambda g: _randn(g, BATCH, D, N), selective_scan_recurrent, selective_scan_chunked),
    "ssd": (ssd_inputs, lambda g: _randn(g, BATCH, H, P, N), ssd_recurrent, ssd_chunked),
}


def _run(fn, x, s, **kw):
    return fn(*x.values(), initial_state=s, **kw)


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("t", [1, 37, 200])
@pytest.mark.parametrize("chunk", [8, 16, 64])
def test_chunked_equals_sequential_in_float64(name, t, chunk):
    inputs, init, ref, fast = OPS[name]
    g = torch.Generator().manual_seed(t * 3 + chunk)
    x, s0 = inputs(t, g), init(g)
    for s in (s0, None):
        y_ref, s_ref = _run(ref, x, s)
        y, s_out = _run(fast, x, s, chunk_size=chunk)
        assert rel_rms_error(y, y_ref) < 1e-12 and rel_rms_error(s_out, s_ref) < 1e-12


@pytest.mark.parametrize("name", list(OPS))
def test_float32_is_close_to_the_float64_reference(name):
    inputs, init, ref, fast = OPS[name]
    g = torch.Generator().manual_seed(5)
    x, s0 = inputs(150, g), init(g)
    y_ref, s_ref = _run(ref, x, s0)
    y, s = _run(fast, {k: v.float() for k, v in x.items()}, s0.float(), chunk_size=32)
    assert rel_rms_error(y, y_ref) < 1e-5 and rel_rms_error(s, s_ref) < 1e-5


@pytest.mark.parametrize("name", list(OPS))
def test_large_steps_stay_exact_in_float32(name):
    """delta * A down to about -40 per token: a chunk's decay is far below e^-88, where any
    exp(b_t) exp(-b_s) factorisation would overflow float32."""
    inputs, init, ref, fast = OPS[name]
    g = torch.Generator().manual_seed(6)
    x = inputs(130, g, dt_scale=10.0)
    y_ref, _ = _run(ref, x, None)
    y, _ = _run(fast, {k: v.float() for k, v in x.items()}, None, chunk_size=64)
    assert torch.isfinite(y).all() and rel_rms_error(y, y_ref) < 1e-5


@pytest.mark.parametrize("name", list(OPS))
def test_gradients_equal_the_reference(name):
    inputs, init, ref, fast = OPS[name]
    g = torch.Generator().manual_seed(7)
    x = {k: v.requires_grad_(True) for k, v in inputs(45, g).items()}
    s0 = init(g).requires_grad_(True)
    y_ref, s_ref = _run(ref, x, s0)
    w_y, w_s = torch.randn_like(y_ref), torch.randn_like(s_ref)
    leaves = [*x.values(), s0]
    g_ref = torch.autograd.grad((y_ref * w_y).sum() + (s_ref * w_s).sum(), leaves)
    y, s = _run(fast, x, s0, chunk_size=16)
    g_fast = torch.autograd.grad((y * w_y).sum() + (s * w_s).sum(), leaves)
    for key, a, b in zip([*x, "state"], g_fast, g_ref):
        assert torch.isfinite(a).all() and rel_rms_error(a, b) < 1e-10, key


@pytest.mark.parametrize("name", list(OPS))
def test_two_halves_with_the_carried_state_equal_the_whole(name):
    inputs, _, _, fast = OPS[name]
    x = inputs(151, torch.Generator().manual_seed(8))
    whole, s_whole = _run(fast, x, None, chunk_size=32)
    first = {k: v if k == "A" else v[:, :70] for k, v in x.items()}
    second = {k: v if k == "A" else v[:, 70:] for k, v in x.items()}
    a, s_a = _run(fast, first, None, chunk_size=32)
    b, s_b = _run(fast, second, s_a, chunk_size=32)
    assert rel_rms_error(torch.cat([a, b], dim=1), whole) < 1e-12 and rel_rms_error(s_b, s_whole) < 1e-12


def test_ssd_is_invariant_to_the_chunk_size():
    x = ssd_inputs(301, torch.Generator().manual_seed(9))
    ys = [_run(ssd_chunked, x, None, chunk_size=c)[0] for c in (1, 7, 32, 64, 301, 512)]
    assert all(rel_rms_error(y, ys[0]) < 1e-12 for y in ys[1:])


def test_ssd_with_one_head_per_group_is_the_grouped_scan_repeated():
    """Groups share B and C: G = 2 groups over 4 heads == 4 groups with B, C repeated."""
    x = ssd_inputs(50, torch.Generator().manual_seed(10))
    grouped, _ = _run(ssd_chunked, x, None, chunk_size=16)
    rep = dict(x, B=x["B"].repeat_interleave(2, dim=2), C=x["C"].repeat_interleave(2, dim=2))
    assert rel_rms_error(_run(ssd_chunked, rep, None, chunk_size=16)[0], grouped) < 1e-12


def test_mamba_scan_is_ssd_when_the_decay_is_one_scalar_per_head():
    """A selective scan whose A is constant over the state and whose channels are one head's
    P channels is SSD with one head of dimension P: the two ops agree."""
    g = torch.Generator().manual_seed(11)
    t = 40
    x = ssd_inputs(t, g)
    x = dict(x, x=x["x"][:, :, :1], dt=x["dt"][:, :, :1], A=x["A"][:1], B=x["B"][:, :, :1], C=x["C"][:, :, :1])
    y_ssd, s_ssd = _run(ssd_chunked, x, None, chunk_size=16)  # (B, T, 1, P), (B, 1, P, N)
    dt = x["dt"].expand(BATCH, t, P)  # every channel of the head shares the head's dt
    y, s = selective_scan_chunked(x["x"][:, :, 0], dt, x["A"].expand(P, N), x["B"][:, :, 0], x["C"][:, :, 0], chunk_size=16)
    assert rel_rms_error(y, y_ssd[:, :, 0]) < 1e-12 and rel_rms_error(s, s_ssd[:, 0]) < 1e-12


def test_the_scan_saves_its_inputs_not_its_states_for_the_backward():
    """The chunked scan's backward is written out: autograd keeps the inputs and one state per
    chunk, never a state per token (T x D x N numbers; autograd's own graph held ~6 of those)."""
    t, d, n = 512, 64, 16
    g = torch.Generator().manual_seed(12)
    x = {"u": torch.randn(1, t, d, generator=g), "delta": torch.rand(1, t, d, generator=g) * 0.1,
         "A": -torch.rand(d, n, generator=g), "B": torch.randn(1, t, n, generator=g), "C": torch.randn(1, t, n, generator=g)}
    x = {k: v.requires_grad_(True) for k, v in x.items()}
    saved = {}

    def pack(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        y, s = selective_scan_chunked(*x.values(), chunk_size=32)
    per_token_states = t * d * n * 4
    assert sum(saved.values()) < per_token_states / 4, (sum(saved.values()), per_token_states)  # measured 1/5.3
    (y.sum() + s.sum()).backward()
    assert all(torch.isfinite(v.grad).all() for v in x.values())


@pytest.mark.parametrize("name", list(OPS))
def test_long_sequences_run_in_segments_with_the_same_result(name):
    inputs, init, ref, fast = OPS[name]
    g = torch.Generator().manual_seed(13)
    x = {k: v.requires_grad_(True) for k, v in inputs(203, g).items()}
    s0 = init(g)
    y_ref, s_ref = _run(ref, x, s0)
    y, s = _run(fast, x, s0, chunk_size=16, segment=50)  # 5 segments, the last one 3 tokens
    assert rel_rms_error(y, y_ref) < 1e-12 and rel_rms_error(s, s_ref) < 1e-12
    w = torch.randn_like(y_ref)
    g_ref = torch.autograd.grad((y_ref * w).sum(), list(x.values()))
    g_seg = torch.autograd.grad((y * w).sum(), list(x.values()))
    assert all(rel_rms_error(a, b) < 1e-10 for a, b in zip(g_seg, g_ref))


def test_ssd_is_gated_linear_attention_with_one_decay_per_head():
    """The layout the fla backend relies on (queries C, keys B, values dt x, state transposed),
    checked here with the torch GLA so that only fla's kernel itself needs a GPU."""
    g = torch.Generator().manual_seed(14)
    x, s0 = ssd_inputs(77, g), _randn(g, BATCH, H, P, N)
    y_ref, s_ref = _run(ssd_recurrent, x, s0)
    y, s = _run(ssd_as_gla, x, s0, chunk_size=16)
    assert rel_rms_error(y, y_ref) < 1e-12 and rel_rms_error(s, s_ref) < 1e-12
