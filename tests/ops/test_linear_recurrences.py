"""Chunked forms of the linear-recurrence ops == their naive recurrent references: outputs,
final states and gradients, float64 and float32, odd lengths, several chunk sizes, with an
initial state and with chaining (two halves with the carried state == the whole)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from speedlm.layers.based import taylor_features
from speedlm.ops.dplr import dplr_chunked, dplr_recurrent
from speedlm.ops.delta_rule import delta_rule_chunked, delta_rule_recurrent
from speedlm.ops.gla import LOG_DECAY_FLOOR, gla_chunked, gla_parallel, gla_recurrent
from speedlm.ops.hgrn import hgrn_chunked, hgrn_recurrent
from speedlm.ops.linear_attention import linear_attention_chunked, linear_attention_recurrent
from speedlm.ops.metrics import rel_rms_error
from speedlm.ops.mlstm import mlstm_chunked, mlstm_recurrent
from speedlm.ops.performer import favor_chunked, favor_dense, favor_features, favor_recurrent, orthogonal_gaussian

B, H, DK, DV = 2, 2, 8, 6


@dataclass
class Op:
    """inputs(t, generator) -> dict of float64 tensors (differentiable ones first); init(gen) ->
    an initial state; ref / fast(inputs, init[, chunk]) -> (out, state)."""

    inputs: Callable
    init: Callable
    ref: Callable
    fast: Callable
    tol32: float = 2e-5  # float32 fast form against the float64 reference


def _randn(g, *shape):
    return torch.randn(*shape, dtype=torch.float64, generator=g)


def _qkv(t, g):
    return {"q": _randn(g, B, H, t, DK), "k": _randn(g, B, H, t, DK), "v": _randn(g, B, H, t, DV)}


def _gla_inputs(per_channel):
    def make(t, g):
        x = _qkv(t, g)
        x["g"] = -torch.rand(B, H, t, DK if per_channel else 1, dtype=torch.float64, generator=g) * 1.5
        return x

    return make


def _mlstm_inputs(t, g):
    x = _qkv(t, g)
    x["lf"] = F.logsigmoid(_randn(g, B, H, t) * 2 + 2)
    x["ig"] = _randn(g, B, H, t) * 3  # exponential input gates from e^-9 to e^9: the stabiliser matters
    return x


def _dplr_inputs(t, g):
    # RWKV-7's shapes: a = -kappa, b = kappa * rate, per-channel log decays down to -exp(-1/2)
    x = _qkv(t, g)
    kappa = F.normalize(_randn(g, B, H, t, DK), dim=-1)
    x["a"], x["b"] = -kappa, kappa * torch.rand(B, H, t, DK, dtype=torch.float64, generator=g)
    x["w"] = -0.6065 * torch.rand(B, H, t, DK, dtype=torch.float64, generator=g)
    return x


def _mlstm_init(g):
    return (_randn(g, B, H, DK, DV), _randn(g, B, H, DK), _randn(g, B, H))


def _delta_inputs(gated):
    def make(t, g):
        x = _qkv(t, g)
        x["k"] = F.normalize(x["k"], dim=-1)
        x["q"] = F.normalize(x["q"], dim=-1)
        x["beta"] = torch.rand(B, H, t, dtype=torch.float64, generator=g)
        if gated:
            x["g"] = -torch.rand(B, H, t, dtype=torch.float64, generator=g) * 2
        return x

    return make


def _matrix_state(g):
    return _randn(g, B, H, DK, DV)


PROJ = orthogonal_gaussian(20, DK, torch.Generator().manual_seed(5), torch.float64)


def _favor_inputs(t, g):
    x = _qkv(t, g)
    qf, _ = favor_features(x["q"], PROJ)
    kf, ka = favor_features(x["k"], PROJ)
    return {"qf": qf, "kf": kf, "ka": ka, "v": x["v"]}


def _favor_init(g):
    s = torch.rand(B, H, 20, DV, dtype=torch.float64, generator=g)
    z = torch.rand(B, H, 20, dtype=torch.float64, generator=g) + 0.5
    return (s, z, _randn(g, B, H))


TAYLOR_DIM = 4  # 1 + 4 + 16 = 21 features: the map's structure at a size the float64 loop can afford


def _taylor_inputs(t, g):
    q, k, v = _randn(g, B, H, t, TAYLOR_DIM), _randn(g, B, H, t, TAYLOR_DIM), _randn(g, B, H, t, DV)
    return {"q": taylor_features(q * 0.5), "k": taylor_features(k * 0.5), "v": v}


def _la_init(g):
    n = 1 + TAYLOR_DIM + TAYLOR_DIM**2
    return (_randn(g, B, H, n, DV) * 0.1, torch.rand(B, H, n, dtype=torch.float64, generator=g) + 1.0)


OPS = {
    "gla-per-channel": Op(_gla_inputs(True), _matrix_state,
                          lambda x, s: gla_recurrent(x["q"], x["k"], x["v"], x["g"], initial_state=s),
                          lambda x, s, c: gla_chunked(x["q"], x["k"], x["v"], x["g"], initial_state=s, chunk_size=c)),
    "gla-per-head": Op(_gla_inputs(False), _matrix_state,
                       lambda x, s: gla_recurrent(x["q"], x["k"], x["v"], x["g"], initial_state=s),
                       lambda x, s, c: gla_chunked(x["q"], x["k"], x["v"], x["g"], initial_state=s, chunk_size=c)),
    "deltanet": Op(_delta_inputs(False), _matrix_state,
                   lambda x, s: delta_rule_recurrent(x["q"], x["k"], x["v"], x["beta"], initial_state=s),
                   lambda x, s, c: delta_rule_chunked(x["q"], x["k"], x["v"], x["beta"], initial_state=s, chunk_size=c)),
    "gated-deltanet": Op(_delta_inputs(True), _matrix_state,
                         lambda x, s: delta_rule_recurrent(x["q"], x["k"], x["v"], x["beta"], x["g"], initial_state=s),
                         lambda x, s, c: delta_rule_chunked(x["q"], x["k"], x["v"], x["beta"], x["g"], initial_state=s,
                                                            chunk_size=c)),
    "hgrn": Op(lambda t, g: {"x": _randn(g, B, t, DV), "g": -torch.rand(B, t, DV, dtype=torch.float64, generator=g) * 2},
               lambda g: _randn(g, B, DV),
               lambda x, s: hgrn_recurrent(x["x"], x["g"], s),
               lambda x, s, c: hgrn_chunked(x["x"], x["g"], s, chunk_size=c)),
    "mlstm": Op(_mlstm_inputs, _mlstm_init,
                lambda x, s: mlstm_recurrent(x["q"], x["k"], x["v"], x["lf"], x["ig"], initial_state=s),
                lambda x, s, c: mlstm_chunked(x["q"], x["k"], x["v"], x["lf"], x["ig"], initial_state=s, chunk_size=c),
                # dividing by |n . q| amplifies rounding where it is small: the float32 recurrence
                # itself is 9e-6 off at T = 63
                tol32=5e-5),
    "rwkv7-dplr": Op(_dplr_inputs, _matrix_state,
                     lambda x, s: dplr_recurrent(x["q"], x["k"], x["v"], x["a"], x["b"], x["w"], initial_state=s),
                     lambda x, s, c: dplr_chunked(x["q"], x["k"], x["v"], x["a"], x["b"], x["w"], initial_state=s,
                                                  chunk_size=c)),
    "performer": Op(_favor_inputs, _favor_init,
                    lambda x, s: favor_recurrent(x["qf"], x["kf"], x["ka"], x["v"], s),
                    lambda x, s, c: favor_chunked(x["qf"], x["kf"], x["ka"], x["v"], s, chunk_size=c)),
    "based-taylor": Op(_taylor_inputs, _la_init,
                       lambda x, s: linear_attention_recurrent(x["q"], x["k"], x["v"], s),
                       lambda x, s, c: linear_attention_chunked(x["q"], x["k"], x["v"], s, chunk_size=c)),
}


def _states(s):
    return list(s) if isinstance(s, tuple) else [s]


def _err_states(a, b):
    return max(rel_rms_error(x, y) for x, y in zip(_states(a), _states(b)))


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("t", [1, 63, 200, 1000])
@pytest.mark.parametrize("chunk", [16, 32, 64])
def test_chunked_equals_recurrent_in_float64(name, t, chunk):
    op, g = OPS[name], torch.Generator().manual_seed(t * 7 + chunk)
    x, s0 = op.inputs(t, g), op.init(g)
    o_ref, s_ref = op.ref(x, s0)
    o, s = op.fast(x, s0, chunk)
    assert rel_rms_error(o, o_ref) < 1e-12 and _err_states(s, s_ref) < 1e-12
    o_ref0, s_ref0 = op.ref(x, None)  # and from an empty state
    o0, s0_fast = op.fast(x, None, chunk)
    assert rel_rms_error(o0, o_ref0) < 1e-12 and _err_states(s0_fast, s_ref0) < 1e-12


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("t", [63, 200])
def test_chunked_float32_is_close_to_the_float64_reference(name, t):
    op, g = OPS[name], torch.Generator().manual_seed(t)
    x, s0 = op.inputs(t, g), op.init(g)
    o_ref, s_ref = op.ref(x, s0)
    as32 = lambda v: tuple(e.float() for e in v) if isinstance(v, tuple) else v.float()  # noqa: E731
    o, s = op.fast({k: v.float() for k, v in x.items()}, as32(s0), 32)
    assert rel_rms_error(o, o_ref) < op.tol32 and _err_states(s, s_ref) < op.tol32


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("t", [63, 200])
def test_gradients_equal_the_references(name, t):
    op, g = OPS[name], torch.Generator().manual_seed(t + 3)
    x = {k: v.requires_grad_(v.is_floating_point()) for k, v in op.inputs(t, g).items()}
    s0 = op.init(g)
    s0 = tuple(v.requires_grad_(True) for v in s0) if isinstance(s0, tuple) else s0.requires_grad_(True)
    leaves = list(x.values()) + _states(s0)
    w_o = torch.randn(op.ref(x, s0)[0].shape, dtype=torch.float64, generator=g)

    def loss(out, state):
        return (out * w_o).sum() + sum(sv.sum() for sv in _states(state))

    ref = torch.autograd.grad(loss(*op.ref(x, s0)), leaves, allow_unused=True)
    fast = torch.autograd.grad(loss(*op.fast(x, s0, 16)), leaves, allow_unused=True)
    for name_, a, b in zip(list(x) + ["state"] * len(_states(s0)), fast, ref):
        if b is None:
            assert a is None or a.abs().max() == 0, name_
            continue
        assert torch.isfinite(a).all() and rel_rms_error(a, b) < 1e-10, name_


@pytest.mark.parametrize("name", list(OPS))
def test_two_halves_with_the_carried_state_equal_the_whole(name):
    op, g = OPS[name], torch.Generator().manual_seed(11)
    x = op.inputs(151, g)
    whole, s_whole = op.fast(x, None, 32)
    time_dim = 1 if name == "hgrn" else 2
    first = {k: v.narrow(time_dim, 0, 70) for k, v in x.items()}
    second = {k: v.narrow(time_dim, 70, 81) for k, v in x.items()}
    a, s_a = op.fast(first, None, 32)
    b, s_b = op.fast(second, s_a, 32)
    assert rel_rms_error(torch.cat([a, b], dim=time_dim), whole) < 1e-12 and _err_states(s_b, s_whole) < 1e-12


def test_retention_parallel_form_equals_the_recurrence():
    g = torch.Generator().manual_seed(2)
    x = _gla_inputs(False)(97, g)
    assert rel_rms_error(gla_parallel(x["q"], x["k"], x["v"], x["g"]), gla_recurrent(x["q"], x["k"], x["v"], x["g"])[0]) < 1e-12


def test_per_channel_decay_is_exact_in_float32_down_to_the_floor():
    """The GLA mixer floors its log gates at -LOG_DECAY_FLOOR; the chunked form stays exact there."""
    g = torch.Generator().manual_seed(4)
    x = _gla_inputs(True)(130, g)
    x["g"] = torch.full_like(x["g"], -LOG_DECAY_FLOOR)
    ref, _ = gla_recurrent(*(x[k] for k in ("q", "k", "v", "g")))
    fast, _ = gla_chunked(*(x[k].float() for k in ("q", "k", "v", "g")), chunk_size=64)
    assert torch.isfinite(fast).all() and rel_rms_error(fast, ref) < 1e-5


def test_performer_prefix_sums_equal_the_masked_quadratic_form():
    g = torch.Generator().manual_seed(6)
    x = _favor_inputs(90, g)
    dense = favor_dense(x["qf"], x["kf"], x["ka"], x["v"], causal=True)
    assert rel_rms_error(favor_chunked(x["qf"], x["kf"], x["ka"], x["v"])[0], dense) < 1e-12


def test_performer_keys_never_depend_on_later_keys():
    """The stabiliser uses a running maximum: a huge key late in the sequence changes nothing
    before it (a global-max stabiliser would rescale every earlier key's features)."""
    g = torch.Generator().manual_seed(8)
    x = _favor_inputs(80, g)
    out = favor_chunked(x["qf"], x["kf"], x["ka"], x["v"], chunk_size=16)[0]
    x["ka"] = x["ka"].clone()
    x["ka"][:, :, 60] += 500.0  # exp(500) would overflow float64 without the stabiliser
    out2 = favor_chunked(x["qf"], x["kf"], x["ka"], x["v"], chunk_size=16)[0]
    assert torch.isfinite(out2).all()
    assert torch.equal(out[:, :, :60], out2[:, :, :60])


def test_performer_approaches_softmax_attention_as_features_grow():
    from speedlm.ops.attention import attention_reference, causal_mask

    g = torch.Generator().manual_seed(9)
    q, k, v = (_randn(g, 1, 2, 64, 16) * 0.5 for _ in range(3))
    exact = attention_reference(q, k, v, causal_mask(64, 64))
    errors = []
    for m in (16, 64, 256, 1024):
        err = 0.0
        for seed in range(4):
            w = orthogonal_gaussian(m, 16, torch.Generator().manual_seed(seed), torch.float64)
            qf, _ = favor_features(q, w)
            kf, ka = favor_features(k, w)
            err += rel_rms_error(favor_chunked(qf, kf, ka, v)[0], exact) / 4
        errors.append(err)
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.1


def test_orthogonal_features_are_orthogonal_within_a_block_and_gaussian_in_norm():
    w = orthogonal_gaussian(2048, 16, torch.Generator().manual_seed(0), torch.float64)
    block = w[:16] / w[:16].norm(dim=1, keepdim=True)
    assert (block @ block.t() - torch.eye(16, dtype=torch.float64)).abs().max() < 1e-12
    assert w.norm(dim=1).pow(2).mean() == pytest.approx(16, rel=0.05)  # E|g|^2 = d


def _backward_bytes(op: Op, t: int, chunk: int) -> int:
    """Bytes the backward of the chunked form allocates (profiler timeline, positive entries)."""
    from torch.profiler import profile

    x = {k: v.requires_grad_() for k, v in op.inputs(t, torch.Generator().manual_seed(0)).items()}
    out, s = op.fast(x, None, chunk)
    loss = out.sum() + sum(z.sum() for z in _states(s))
    with profile(profile_memory=True) as prof:
        loss.backward()
    return sum(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0)


@pytest.mark.parametrize("name", list(OPS))
def test_backward_memory_is_linear_in_the_number_of_chunks(name):
    """4x the chunks, about 4x the backward allocations (measured 3.9-4.05; HGRN's scan over
    chunk ends 5.2). Taking the per-chunk slices by indexing made each slice's gradient a zero
    tensor the size of the whole, O(N^2): the delta rule written that way gave 11x here."""
    small, large = _backward_bytes(OPS[name], 8 * 4, 4), _backward_bytes(OPS[name], 32 * 4, 4)
    assert large / small < 7.0, (small, large)


def test_the_generalised_delta_rule_without_decay_is_the_delta_rule():
    # a = -k, b = beta k, keys beta k, no decay: S_t = (I - beta k k^T) S_{t-1} + beta k v^T
    g = torch.Generator().manual_seed(5)
    x = _delta_inputs(False)(57, g)
    beta = x["beta"][..., None]
    out, state = dplr_chunked(x["q"], beta * x["k"], x["v"], -x["k"], beta * x["k"], torch.zeros_like(x["k"]),
                              chunk_size=16)
    ref, ref_state = delta_rule_recurrent(x["q"], x["k"], x["v"], x["beta"], scale=1.0)
    assert rel_rms_error(out, ref) < 1e-12 and rel_rms_error(state, ref_state) < 1e-12
