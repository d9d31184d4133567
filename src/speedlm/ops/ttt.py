"""TTT-Linear's inner loop (Sun et al. 2024, Learning to (Learn at Test Time), arXiv:2407.04620):
the hidden state is a linear model trained by gradient descent on the sequence itself.

Per head, the inner model is f(x; W, c) = x + LN(x W + c) (LayerNorm with gains gamma and
biases beta over the head's channels), its loss on token s is l_s = 1/2 ||f(k_s) - v_s||^2, and
the output for a query is f(q_t) under the weights after token t. Mini-batch gradient descent:
inside a mini-batch of `batch` positions (aligned to absolute positions 0, b, 2b, ...) every
gradient is taken at the weights the mini-batch started with,

    W_t = W_0 - (1 / i_t) sum_{s <= t in the mini-batch} eta_s grad_W l_s(W_0),     i_t = t's index in it, from 1

(the 1 / i_t is the paper's token-index scaling: the mean of the gradients so far), and the next
mini-batch starts from the weights after its last token. batch = 1 is plain online gradient
descent, one step per token.

q, k, v (B, H, T, D); eta (B, H, T) inner learning rates; gamma, beta (H, D). State
(W_0 (B, H, D, D), c_0 (B, H, D), A (B, H, D, D), a (B, H, D)): the mini-batch's starting
weights and the sums sum eta_s grad l_s of its tokens so far, so that a call may start and end
anywhere inside a mini-batch; `start` is the absolute position of the first token.

The mini-batch ("dual") form: inside a mini-batch all gradients share W_0, so Z = K W_0 + c_0 and
the gradients G w.r.t. Z come in one batched step (LayerNorm's backward written out), and the
queries read W_t through a causal (L x L) product: Q W_t = Q W_0 - (1 / i_t) tril(Q K^T * eta) G.
The loop runs once per mini-batch, not per token.
"""

from __future__ import annotations

import torch

State = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _layer_norm(z, gamma, beta, eps):
    """LN over the last dim with per-head gains (H, D) on (B, H, L, D); returns (out, x_hat, std)."""
    mu = z.mean(-1, keepdim=True)
    std = torch.sqrt((z - mu).pow(2).mean(-1, keepdim=True) + eps)
    x_hat = (z - mu) / std
    return gamma[:, None] * x_hat + beta[:, None], x_hat, std


def _grad_z(k, z, v, gamma, beta, eps):
    """d l / d Z for l = 1/2 ||k + LN(Z) - v||^2, token by token (LayerNorm's backward)."""
    out, x_hat, std = _layer_norm(z, gamma, beta, eps)
    g_hat = (k + out - v) * gamma[:, None]
    return (g_hat - g_hat.mean(-1, keepdim=True) - x_hat * (g_hat * x_hat).mean(-1, keepdim=True)) / std


def empty_state(w0: torch.Tensor, c0: torch.Tensor, batch_size: int) -> State:
    """The state before the first token: the learned initial weights (H, D, D), (H, D) per row."""
    w = w0.expand(batch_size, *w0.shape).clone()
    c = c0.expand(batch_size, *c0.shape).clone()
    return w, c, torch.zeros_like(w), torch.zeros_like(c)


def ttt_linear_recurrent(q, k, v, eta, gamma, beta, state: State, start: int = 0, batch: int = 16, eps: float = 1e-6):
    """Naive reference: one token at a time, the mini-batch rule written out (run it in float64)."""
    w0, c0, acc_w, acc_c = state
    outs = []
    for t in range(q.shape[2]):
        pos = start + t
        index = pos % batch + 1
        kt, vt, qt = k[:, :, t : t + 1], v[:, :, t : t + 1], q[:, :, t : t + 1]
        z = kt @ w0 + c0[:, :, None]
        g = _grad_z(kt, z, vt, gamma, beta, eps)[:, :, 0]  # (B, H, D), at the mini-batch's W_0
        e = eta[:, :, t, None]
        acc_w = acc_w + e[..., None] * kt[:, :, 0, :, None] * g[..., None, :]
        acc_c = acc_c + e * g
        w_t, c_t = w0 - acc_w / index, c0 - acc_c / index
        out, _, _ = _layer_norm(qt @ w_t + c_t[:, :, None], gamma, beta, eps)
        outs.append(qt + out)
        if index == batch:  # the mini-batch ends: its last weights start the next one
            w0, c0 = w_t, c_t
            acc_w, acc_c = torch.zeros_like(acc_w), torch.zeros_like(acc_c)
    return torch.cat(outs, dim=2), (w0, c0, acc_w, acc_c)


def ttt_linear_minibatch(q, k, v, eta, gamma, beta, state: State, start: int = 0, batch: int = 16,
                         eps: float = 1e-6):
    """The dual form (module doc): one step per mini-batch (or the part of one this call holds)."""
    w0, c0, acc_w, acc_c = state
    t = q.shape[2]
    outs = []
    a = 0
    while a < t:
        first = (start + a) % batch  # index of this piece's first token inside its mini-batch, from 0
        e = min(t, a + batch - first)
        n = e - a
        qs, ks, vs, es = q[:, :, a:e], k[:, :, a:e], v[:, :, a:e], eta[:, :, a:e]
        g = _grad_z(ks, ks @ w0 + c0[:, :, None], vs, gamma, beta, eps)  # (B, H, n, D) at W_0
        index = torch.arange(first + 1, first + n + 1, dtype=q.dtype, device=q.device)[:, None]  # i_t
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        # earlier tokens of the mini-batch (acc) and this piece's own, causally, scaled by 1 / i_t
        mix = ((qs @ ks.transpose(-1, -2) + 1) * es[:, :, None, :]).masked_fill(~causal, 0.0)
        z = qs @ w0 + c0[:, :, None] - (qs @ acc_w + acc_c[:, :, None] + mix @ g) / index
        out, _, _ = _layer_norm(z, gamma, beta, eps)
        outs.append(qs + out)
        eg = g * es[..., None]
        acc_w = acc_w + ks.transpose(-1, -2) @ eg
        acc_c = acc_c + eg.sum(2)
        if first + n == batch:
            w0, c0 = w0 - acc_w / batch, c0 - acc_c / batch
            acc_w, acc_c = torch.zeros_like(acc_w), torch.zeros_like(acc_c)
        a = e
    return torch.cat(outs, dim=2), (w0, c0, acc_w, acc_c)
