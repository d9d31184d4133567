"""The generalised delta rule with a diagonal-plus-low-rank transition (RWKV-7's wkv7, Peng et al.
2025, arXiv:2503.14456; fla's "DPLR"):

    S_t = diag(exp(w_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T      state (B, H, Dk, Dv)
    o_t = S_t^T q_t

a per-channel decay exp(w_t) (w <= 0) and a rank-one correction a_t, b_t read from the state
before this token's write. RWKV-7 takes a = -kappa, b = kappa * (in-context learning rate): the
delta rule's removal of what the state held for kappa, at a rate per channel. No scale is applied
to q (RWKV's convention); the caller scales.

q, k, a, b, w (B, H, T, Dk); v (B, H, T, Dv); initial_state (B, H, Dk, Dv) or None; every form
returns (o, final_state).

Chunked form. Inside a chunk, with S_0 the entering state, Gamma_t = exp(sum_{l<=t} w_l) per
channel and u_t^T = a_t^T S_{t-1} (the correction's read), dividing the recurrence by Gamma_t
gives S_t = Gamma_t (S_0 + sum_{j<=t} (k_j v_j^T + b_j u_j^T) / Gamma_j), hence

    (I - strict_tril(A~ B^)) U = A~ S_0 + strict_tril(A~ K^) V
    o     = (Q~ + tril(Q~ B^) X) S_0 + tril(Q~ K^) V + tril(Q~ B^) Y,   U = X S_0 + Y
    S_C   = (diag(Gamma_C) + (Gamma_C B^)^T X) S_0 + (Gamma_C K^)^T V + (Gamma_C B^)^T Y

with A~ = a * Gamma_{t-1}, Q~ = q * Gamma_t, K^ = k / Gamma_j, B^ = b / Gamma_j: every pairwise
decay Gamma_t / Gamma_j <= 1 is a product of two factors, one of which grows as exp(|w| C)
within a chunk. So the form is exact while C times the largest per-step |w| stays far inside
float32's range: RWKV-7's decay is bounded (|w| <= exp(-1/2) = 0.61), and its chunk of 32 keeps
the factor below 3e8. X and Y come from one batched triangular solve for every chunk; only the
state is carried, one product per chunk.
"""

from __future__ import annotations

import torch

from speedlm.ops.chunking import num_chunks, to_chunks
from speedlm.ops.common import zero_matrix_state

State = torch.Tensor


def dplr_recurrent(q, k, v, a, b, w, initial_state: State | None = None):
    """Naive reference: the recurrence, one token at a time (run it in float64)."""
    s = zero_matrix_state(q, v) if initial_state is None else initial_state
    outs = []
    for t in range(q.shape[2]):
        read = torch.einsum("bhk,bhkv->bhv", a[:, :, t], s)  # a_t^T S_{t-1}
        s = (torch.exp(w[:, :, t])[..., None] * s + b[:, :, t, :, None] * read[..., None, :]
             + k[:, :, t, :, None] * v[:, :, t, None, :])
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], s))
    return torch.stack(outs, dim=2), s


def dplr_chunked(q, k, v, a, b, w, initial_state: State | None = None, chunk_size: int = 32):
    """Chunked form (module doc): exact for any length and chunk size within the decay bound."""
    if q.shape[2] == 1:
        return dplr_recurrent(q, k, v, a, b, w, initial_state)
    bsz, h, t, dk = q.shape
    dv = v.shape[-1]
    c, n = num_chunks(t, chunk_size)
    # padding: zero q, k, v, a, b add and read nothing, zero log decays keep the state
    qc, kc, vc, ac, bc, wc = (to_chunks(x, n, c) for x in (q, k, v, a, b, w))
    cum = torch.cumsum(wc, dim=-2)  # (B, H, N, C, Dk), inclusive
    gamma, inv = torch.exp(cum), torch.exp(-cum)
    a_t, q_t = ac * torch.exp(cum - wc), qc * gamma  # a * Gamma_{t-1}, q * Gamma_t
    k_h, b_h = kc * inv, bc * inv
    strict = torch.ones(c, c, dtype=torch.bool, device=q.device).tril(-1)
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    a_ab = (a_t @ b_h.transpose(-1, -2)).masked_fill(~strict, 0.0)
    a_ak = (a_t @ k_h.transpose(-1, -2)).masked_fill(~strict, 0.0)
    a_qk = (q_t @ k_h.transpose(-1, -2)).masked_fill(~causal, 0.0)
    a_qb = (q_t @ b_h.transpose(-1, -2)).masked_fill(~causal, 0.0)
    eye_c = torch.eye(c, dtype=q.dtype, device=q.device)
    solved = torch.linalg.solve_triangular(eye_c - a_ab, torch.cat([a_ak @ vc, a_t], dim=-1), upper=False,
                                           unitriangular=True)
    y, x = solved[..., :dv], solved[..., dv:]  # U = X S_0 + Y
    to_end = torch.exp(cum[..., -1:, :] - cum)  # Gamma_C / Gamma_j <= 1
    k_end, b_end = (kc * to_end).transpose(-1, -2), (bc * to_end).transpose(-1, -2)  # (B, H, N, Dk, C)
    transition = torch.diag_embed(gamma[..., -1, :]) + b_end @ x  # (B, H, N, Dk, Dk)
    inject = k_end @ vc + b_end @ y  # (B, H, N, Dk, Dv)
    reads = q_t + a_qb @ x  # how each output reads the entering state
    out = a_qk @ vc + a_qb @ y
    s = zero_matrix_state(q, v) if initial_state is None else initial_state
    inter = []
    for read, m, r in zip(reads.unbind(2), transition.unbind(2), inject.unbind(2)):  # unbind: ops/chunking.py
        inter.append(read @ s)
        s = m @ s + r
    out = out + torch.stack(inter, dim=2)
    return out.reshape(bsz, h, n * c, dv)[:, :, :t], s
