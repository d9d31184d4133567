"""TTT-Linear's inner loop (ops/ttt.py): the mini-batch (dual) form equals the token-by-token
rule, a call may start and stop inside a mini-batch, and with mini-batches of one token the rule
is online gradient descent on the inner loss, checked against autograd's gradient (so the
LayerNorm backward written out in the op is checked too)."""

import pytest
import torch

from speedlm.ops.metrics import rel_rms_error
from speedlm.ops.ttt import _layer_norm, empty_state, ttt_linear_minibatch, ttt_linear_recurrent

B, H, D = 2, 3, 6


def _inputs(t, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, dtype=torch.float64, generator=g)  # noqa: E731
    q, k, v = r(B, H, t, D), r(B, H, t, D), r(B, H, t, D)
    eta = torch.rand(B, H, t, dtype=torch.float64, generator=g) * 0.5
    gamma, beta = 1 + 0.3 * r(H, D), 0.3 * r(H, D)
    state = empty_state(0.3 * r(H, D, D), 0.1 * r(H, D), B)
    return q, k, v, eta, gamma, beta, state


def _close(a, b):
    return all(torch.allclose(x, y, rtol=1e-10, atol=1e-12) for x, y in zip(a, b))


@pytest.mark.parametrize("batch", [1, 4, 16])
@pytest.mark.parametrize("t", [1, 45])
def test_the_minibatch_form_equals_the_token_by_token_rule(t, batch):
    q, k, v, eta, gamma, beta, state = _inputs(t)
    ref, ref_state = ttt_linear_recurrent(q, k, v, eta, gamma, beta, state, batch=batch)
    out, out_state = ttt_linear_minibatch(q, k, v, eta, gamma, beta, state, batch=batch)
    assert rel_rms_error(out, ref) < 1e-12 and _close(out_state, ref_state)


@pytest.mark.parametrize("cut", [3, 7, 16])
def test_a_call_may_stop_and_resume_inside_a_minibatch(cut):
    q, k, v, eta, gamma, beta, state = _inputs(40, seed=1)
    whole, whole_state = ttt_linear_minibatch(q, k, v, eta, gamma, beta, state, batch=8)
    first, mid = ttt_linear_minibatch(q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], eta[:, :, :cut], gamma, beta,
                                      state, batch=8)
    second, end = ttt_linear_minibatch(q[:, :, cut:], k[:, :, cut:], v[:, :, cut:], eta[:, :, cut:], gamma, beta,
                                       mid, start=cut, batch=8)
    assert rel_rms_error(torch.cat([first, second], 2), whole) < 1e-12 and _close(end, whole_state)


def test_one_token_minibatches_are_online_gradient_descent_by_autograd():
    q, k, v, eta, gamma, beta, state = _inputs(9, seed=2)
    w, c = state[0].clone(), state[1].clone()
    outs = []
    for t in range(9):
        w_, c_ = w.clone().requires_grad_(), c.clone().requires_grad_()
        kt, vt = k[:, :, t : t + 1], v[:, :, t : t + 1]
        pred = kt + _layer_norm(kt @ w_ + c_[:, :, None], gamma, beta, 1e-6)[0]
        loss = 0.5 * (pred - vt).pow(2).sum()  # the rows and heads are independent: their sum
        gw, gc = torch.autograd.grad(loss, (w_, c_))
        w, c = w - eta[:, :, t, None, None] * gw, c - eta[:, :, t, None] * gc
        qt = q[:, :, t : t + 1]
        outs.append(qt + _layer_norm(qt @ w + c[:, :, None], gamma, beta, 1e-6)[0])
    out, _ = ttt_linear_minibatch(q, k, v, eta, gamma, beta, state, batch=1)
    assert rel_rms_error(out, torch.cat(outs, 2)) < 1e-12
