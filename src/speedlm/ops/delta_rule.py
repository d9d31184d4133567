"""The delta rule (DeltaNet; Gated DeltaNet with a decay): a matrix state that is corrected
towards each new value instead of only accumulating it.

    S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T      state (B, H, Dk, Dv)
    o_t = scale * S_t^T q_t

i.e. S_t = a_t S_{t-1} + beta_t k_t (v_t - a_t S_{t-1}^T k_t)^T: the value the state would
have returned for k_t is replaced by v_t at rate beta_t. a_t = exp(g_t) is one decay per head
(Gated DeltaNet, Yang et al. 2024, arXiv:2412.06464); without g it is 1 (DeltaNet, Yang et al.
2024, arXiv:2406.06484). Keys are expected L2-normalised (the mixers do it), so the transition
is a contraction for beta in [0, 1] (up to 2).

q, k (B, H, T, Dk); v (B, H, T, Dv); beta (B, H, T); g (B, H, T) log decays <= 0 or None;
initial_state (B, H, Dk, Dv) or None; every form returns (o, final_state).

Chunked form (the WY/UT representation). Inside a chunk, with S_0 the state entering it and
gamma_t = exp(b_t) the cumulative decay, the state after t tokens is
S_t = gamma_t S_0 + sum_{s<=t} (gamma_t / gamma_s) k_s u_s^T, where the pseudo-values u solve the
unit lower-triangular system

    (I + diag(beta) (strict_tril(K K^T) * Gamma)) U~ = diag(beta) V - diag(beta gamma) K S_0,
    Gamma[t, s] = gamma_t / gamma_s,

so U~ = U - W S_0 with U = T diag(beta) V and W = T diag(beta gamma) K, T the inverse of that
matrix, all computed for every chunk at once by one batched triangular solve. Only
U~ = U - W S_0, the output and the next state need the carried state: three matrix products per
chunk, in order.
"""

from __future__ import annotations

import torch

from speedlm.ops.chunking import num_chunks, to_chunks
from speedlm.ops.common import query_scale, zero_matrix_state

from speedlm.ops import fla
from speedlm.ops.dispatch import Dispatch

State = torch.Tensor


def delta_rule_recurrent(q, k, v, beta, g=None, scale=None, initial_state: State | None = None):
    """Naive reference: the recurrence, one token at a time (run it in float64)."""
    scale = query_scale(q, scale)
    s = zero_matrix_state(q, v) if initial_state is None else initial_state
    outs = []
    for t in range(q.shape[2]):
        if g is not None:
            s = torch.exp(g[:, :, t])[..., None, None] * s
        kt, vt, bt = k[:, :, t], v[:, :, t], beta[:, :, t]
        predicted = torch.einsum("bhkv,bhk->bhv", s, kt)  # what the state returns for k_t
        s = s + bt[..., None, None] * kt[..., :, None] * (vt - predicted)[..., None, :]
        outs.append(scale * torch.einsum("bhkv,bhk->bhv", s, q[:, :, t]))
    return torch.stack(outs, dim=2), s


def delta_rule_step(q, k, v, beta, g=None, scale=None, initial_state: State | None = None):
    """One token (T == 1), for decoding."""
    scale = query_scale(q, scale)
    s = zero_matrix_state(q, v) if initial_state is None else initial_state
    if g is not None:
        s = torch.exp(g[:, :, 0])[..., None, None] * s
    kt, vt, bt = k[:, :, 0], v[:, :, 0], beta[:, :, 0]
    s = s + bt[..., None, None] * kt[..., :, None] * (vt - torch.einsum("bhkv,bhk->bhv", s, kt))[..., None, :]
    return scale * torch.einsum("bhkv,bhk->bhv", s, q[:, :, 0])[:, :, None], s


def delta_rule_chunked(q, k, v, beta, g=None, scale=None, initial_state: State | None = None, chunk_size: int = 64):
    """Chunked form (see module doc): exact for any length and chunk size.

    Everything that does not need the carried state is computed for all chunks at once; the
    state then follows S' = M S + R per chunk, with M = gamma_C I - K_end^T W and R = K_end^T U
    (one product and one addition), and the outputs O = (diag(gamma) Q - A W) S + A U read the
    state of their chunk (A = the masked, decayed Q K^T)."""

    if q.shape[2] == 1:
        return delta_rule_step(q, k, v, beta, g, scale, initial_state)
    scale = query_scale(q, scale)
    bsz, h, t, dk = q.shape
    dv = v.shape[-1]
    c, n = num_chunks(t, chunk_size)
    # padded tokens: zero key, value and beta change nothing; zero log decay keeps the state
    qc, kc, vc = to_chunks(q, n, c), to_chunks(k, n, c), to_chunks(v, n, c)
    betac = to_chunks(beta[..., None], n, c)[..., 0]
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    # the unit lower-triangular solve reads only the strict lower triangle of `system`: K K^T
    # needs no mask, its diagonal and upper part are never read
    kk = kc @ kc.transpose(-1, -2)
    if g is None:
        a_qk = (qc @ kc.transpose(-1, -2)).masked_fill(~causal, 0.0)
        q_decayed, k_end, chunk_decay = qc, kc, None
        beta_gamma = betac
    else:
        b = torch.cumsum(to_chunks(g[..., None], n, c)[..., 0], dim=-1)  # (B, H, N, C)
        gamma = torch.exp(b)
        decay = torch.exp((b[..., :, None] - b[..., None, :]).masked_fill(~causal, float("-inf")))  # 0 above
        a_qk = (qc @ kc.transpose(-1, -2)) * decay
        kk = kk * decay
        q_decayed, k_end = qc * gamma[..., None], kc * torch.exp(b[..., -1:] - b)[..., None]
        chunk_decay = gamma[..., -1][..., None, None]  # (B, H, N, 1, 1)
        beta_gamma = betac * gamma
    system = betac[..., :, None] * kk
    rhs = torch.cat([betac[..., None] * vc, beta_gamma[..., None] * kc], dim=-1)  # [diag(beta) V | diag(beta gamma) K]
    solved = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    u, w = solved[..., :dv], solved[..., dv:]  # (B, H, N, C, Dv), (B, H, N, C, Dk)

    k_end_t = k_end.transpose(-1, -2)
    eye = torch.eye(dk, dtype=q.dtype, device=q.device)
    transition = (eye if chunk_decay is None else chunk_decay * eye) - k_end_t @ w  # (B, H, N, Dk, Dk)
    inject = k_end_t @ u  # (B, H, N, Dk, Dv)
    reads = q_decayed - a_qk @ w  # how each output reads the state entering its chunk
    out = a_qk @ u
    s = zero_matrix_state(q, v) if initial_state is None else initial_state
    inter = []
    # the carried state: S' = M S + R, and what the chunk's outputs read of S (unbind, not
    # indexing: each indexed slice's backward would write a zero tensor the size of the whole)
    for read, m, r in zip(reads.unbind(2), transition.unbind(2), inject.unbind(2)):
        inter.append(read @ s)
        s = m @ s + r
    out = out + torch.stack(inter, dim=2)
    return (scale * out).reshape(bsz, h, n * c, dv)[:, :, :t], s


# one dispatch: the torch form everywhere; fla's Triton kernels on CUDA when `fla-core` is installed
DELTA_RULE = Dispatch("delta rule", "torch", delta_rule_chunked)
DELTA_RULE.register("fla", fla.delta_rule, usable=fla.fla_usable)
