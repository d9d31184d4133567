"""MoE routing and the sorted grouped dispatch (speedlm/ops/moe.py) against the dense
all-experts reference, in float64 (padded batched path) and float32 (grouped_mm where it runs)."""

import math

import pytest
import torch

from speedlm.ops import moe
from speedlm.ops.moe import balance_loss, expert_capacity, moe_swiglu, moe_swiglu_reference, route_topk, z_loss


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def weights(e, d, h, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=dtype) * 0.3 for s in ((e, d, h), (e, d, h), (e, h, d))]


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("k", [1, 2])
def test_sorted_grouped_dispatch_equals_the_dense_reference_with_gradients(dtype, tol, k):
    n, d, h, e = 37, 8, 12, 6
    x = torch.randn(n, d, dtype=dtype, requires_grad=True)
    logits = torch.randn(n, e, dtype=dtype)
    logits[:, 5] = -1e4  # expert 5 never chosen: an empty group
    ws = [w.requires_grad_() for w in weights(e, d, h, dtype)]
    rw, experts, _ = route_topk(logits, k)
    y, kept = moe_swiglu(x, rw, experts, *ws)
    ref = moe_swiglu_reference(x, rw, experts, *ws)
    assert kept.all() and rel(y, ref) < tol
    grads = torch.autograd.grad(y.square().sum(), [x, *ws])
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *ws])
    for g, r in zip(grads, ref_grads):
        assert rel(g, r) < tol
    assert grads[1][5].abs().max() == 0  # the empty expert gets no gradient


def test_capacity_drops_the_latest_assignments_and_they_add_nothing():
    n, d, h, e, k = 40, 8, 12, 4, 2
    x = torch.randn(n, d, dtype=torch.float64)
    logits = torch.randn(n, e, dtype=torch.float64)
    logits[:, 0] += 3.0  # everyone wants expert 0: it overflows
    ws = weights(e, d, h, torch.float64)
    rw, experts, _ = route_topk(logits, k)
    cap = expert_capacity(n, k, e, 1.0)
    assert cap == 20
    y, kept = moe_swiglu(x, rw, experts, *ws, capacity=cap)
    counts = torch.bincount(experts[kept], minlength=e)
    assert int(counts.max()) <= cap and not kept.all()
    # the assignments to expert 0 that were kept are its first `cap` in token order
    to_zero = (experts == 0).nonzero()[:, 0]
    assert torch.equal(kept[experts == 0], torch.arange(len(to_zero)) < cap)
    assert rel(y, moe_swiglu_reference(x, rw, experts, *ws, kept=kept)) < 1e-12
    # top-1: a dropped token has no expert left, the FFN adds nothing (it rides the residual)
    rw1, experts1, _ = route_topk(logits, 1)
    y1, kept1 = moe_swiglu(x, rw1, experts1, *ws, capacity=expert_capacity(n, 1, e, 1.0))
    dropped = ~kept1[:, 0]
    assert dropped.any() and y1[dropped].abs().max() == 0 and y1[~dropped].abs().min() > 0


def test_router_weights_renormalise_over_the_chosen_experts_in_float32():
    logits = torch.randn(9, 8, dtype=torch.bfloat16)
    rw, experts, probs = route_topk(logits, 2)
    assert rw.dtype == probs.dtype == torch.float32
    assert torch.allclose(rw.sum(-1), torch.ones(9))
    assert torch.equal(experts, probs.topk(2, -1).indices)


def test_balance_loss_is_the_switch_definition_on_hand_cases():
    """Switch (Fedus et al. 2021, eq. 4-6): E * sum_i f_i * P_i, P_i the mean router probability,
    f_i the fraction of the N * k assignments that go to expert i (so 1 when balanced, for any
    k). Catches f counted per token (k times larger), P from the chosen weights, a missing E."""
    # top-1, two tokens: f = (1/2, 1/2, 0), P = ((0.4 + 0) / 2, (0.3 + 0.5) / 2, (0.3 + 0.5) / 2);
    # = 0.9: below 1, so a per-layer balance term has no floor at 1
    probs = torch.tensor([[0.4, 0.3, 0.3], [0.0, 0.5, 0.5]], dtype=torch.float64)
    assert balance_loss(probs, torch.tensor([[0], [1]])).item() == pytest.approx(3 * (1 / 2 * 0.2 + 1 / 2 * 0.4))
    # top-2 over four experts: assignments {0, 1} and {0, 3}: f = (2/4, 1/4, 0, 1/4), P = (0.45, 0.2, 0.1, 0.25)
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.4, 0.1, 0.1, 0.4]], dtype=torch.float64)
    expected = 4 * (2 / 4 * 0.45 + 1 / 4 * 0.2 + 0 * 0.1 + 1 / 4 * 0.25)
    assert balance_loss(probs, torch.tensor([[0, 1], [0, 3]])).item() == pytest.approx(expected)  # 1.35
    n, e = 64, 8
    for k in (1, 2, 4):  # uniform probabilities and every expert taking N k / E assignments: exactly 1
        balanced = (torch.arange(n * k) % e).view(n, k)
        assert balance_loss(torch.full((n, e), 1.0 / e), balanced).item() == pytest.approx(1.0)
    # everything to expert 0 with P_0 = e^4 / (e^4 + 7): E * P_0
    skewed = torch.softmax(torch.tensor([4.0] + [0.0] * (e - 1), dtype=torch.float64).expand(n, e), -1)
    p0 = math.exp(4) / (math.exp(4) + 7)
    assert balance_loss(skewed, torch.zeros(n, 1, dtype=torch.long)).item() == pytest.approx(8 * p0)


def test_z_loss_is_the_mean_squared_logsumexp_on_a_hand_case():
    """ST-MoE (Zoph et al. 2022, eq. 5): mean over tokens of logsumexp(logits)^2. Catches a
    missing square, a sum over tokens, or a logsumexp over the token axis."""
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [math.log(7.0), 0.0]], dtype=torch.float64)
    ln2 = math.log(2.0)  # logsumexp per row: ln 2, ln 4 = 2 ln 2, ln 8 = 3 ln 2
    assert z_loss(logits).item() == pytest.approx((ln2**2 + (2 * ln2) ** 2 + (3 * ln2) ** 2) / 3)


def test_the_padded_fallback_equals_grouped_mm():
    n, d, h, e = 50, 16, 16, 4
    x = torch.randn(n, d)
    rw, experts, _ = route_topk(torch.randn(n, e), 2)
    ws = weights(e, d, h, torch.float32)
    padded, _ = moe_swiglu(x, rw, experts, *ws, backend="padded")
    assert rel(padded, moe_swiglu_reference(x, rw, experts, *ws)) < 1e-5
    if hasattr(torch, "_grouped_mm"):  # forward only: grouped_mm's CPU backward may be missing
        try:
            grouped, _ = moe_swiglu(x, rw, experts, *ws, backend="grouped_mm")
        except RuntimeError:
            pytest.skip("torch._grouped_mm does not run here")
        assert rel(grouped, padded) < 1e-5
    assert moe._grouped_mm_works(torch.device("cpu"), torch.float64) is False  # no float64 grouped_mm


def test_the_per_expert_loop_baseline_equals_the_reference():
    from speedlm.ops.moe import moe_swiglu_loop

    n, d, h, e = 30, 8, 12, 5
    x = torch.randn(n, d, dtype=torch.float64)
    logits = torch.randn(n, e, dtype=torch.float64)
    logits[:, 4] = -1e4
    rw, experts, _ = route_topk(logits, 2)
    ws = weights(e, d, h, torch.float64)
    assert rel(moe_swiglu_loop(x, rw, experts, *ws), moe_swiglu_reference(x, rw, experts, *ws)) < 1e-12


@pytest.mark.parametrize("backend", ["padded", "sliced"])
def test_every_dispatch_backend_equals_the_reference_with_capacity_and_gradients(backend):
    n, d, h, e, k = 45, 8, 12, 5, 2
    x = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(n, e, dtype=torch.float64)
    logits[:, 0] += 2.0
    logits[:, 4] = -1e4
    ws = [w.requires_grad_() for w in weights(e, d, h, torch.float64)]
    rw, experts, _ = route_topk(logits, k)
    for cap in (None, expert_capacity(n, k, e, 1.0)):
        y, kept = moe_swiglu(x, rw, experts, *ws, capacity=cap, backend=backend)
        ref = moe_swiglu_reference(x, rw, experts, *ws, kept=kept)
        assert rel(y, ref) < 1e-12
        for g, r in zip(torch.autograd.grad(y.sum(), [x, *ws]), torch.autograd.grad(ref.sum(), [x, *ws])):
            assert rel(g, r) < 1e-12
    with pytest.raises(ValueError, match="unknown MoE dispatch backend"):
        moe_swiglu(x, rw, experts, *ws, backend="triton")
