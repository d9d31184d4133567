"""The mLSTM cell (xLSTM, Beck et al. 2024, arXiv:2405.04517): a matrix memory with an
exponential input gate, a forget gate and a normaliser state,

    C_t = f_t C_{t-1} + i_t k_t v_t^T       n_t = f_t n_{t-1} + i_t k_t
    h_t = C_t^T q_t s / max(|n_t . q_t s|, 1)        i_t = exp(ig_t), f_t = exp(lf_t), s = 1/sqrt(Dk)

Because i_t is an exponential, the states are kept scaled by exp(-m_t), a running maximum of the
log weights (the stabiliser): m_t = max(lf_t + m_{t-1}, ig_t), and then the floor 1 of the
normaliser becomes exp(-m_t). Any consistent m gives the same h, so the forms below may choose
their own (m_0 = 0 with empty states, as the paper's recurrence).

q, k (B, H, T, Dk); v (B, H, T, Dv); lf, ig (B, H, T) log forget gates (<= 0) and input-gate
pre-activations. State: (C (B, H, Dk, Dv), n (B, H, Dk), m (B, H)), or None for empty.

The chunked form: inside a chunk of C tokens the log weight of key j for query i is
b_i - b_j + ig_j (b the chunk's inclusive cumulative log forget), from the carried state
b_i + m_prev; each query takes its own maximum over both, so every exponential is <= 1. The
intra-chunk products for all chunks are batched; only the state (and its stabiliser) is carried
from chunk to chunk, one update each.
"""

from __future__ import annotations

import torch

from speedlm.ops.chunking import to_chunks

State = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _empty(q, v) -> State:
    b, h, _, dk = q.shape
    return (q.new_zeros(b, h, dk, v.shape[-1]), q.new_zeros(b, h, dk), q.new_zeros(b, h))


def mlstm_recurrent(q, k, v, lf, ig, initial_state: State | None = None):
    """Naive reference: the stabilised recurrence, one token at a time (run it in float64)."""
    scale = q.shape[-1] ** -0.5
    c, n, m = _empty(q, v) if initial_state is None else initial_state
    outs = []
    for t in range(q.shape[2]):
        m_new = torch.maximum(lf[:, :, t] + m, ig[:, :, t])
        i = torch.exp(ig[:, :, t] - m_new)
        f = torch.exp(lf[:, :, t] + m - m_new)
        c = f[..., None, None] * c + i[..., None, None] * k[:, :, t, :, None] * v[:, :, t, None, :]
        n = f[..., None] * n + i[..., None] * k[:, :, t]
        qt = q[:, :, t] * scale
        num = torch.einsum("bhk,bhkv->bhv", qt, c)
        den = torch.einsum("bhk,bhk->bh", qt, n).abs()
        outs.append(num / torch.maximum(den, torch.exp(-m_new))[..., None])
        m = m_new
    return torch.stack(outs, dim=2), (c, n, m)


def mlstm_chunked(q, k, v, lf, ig, initial_state: State | None = None, chunk_size: int = 64):
    """Chunked form (module doc): exact for any length and chunk size."""
    scale = q.shape[-1] ** -0.5
    bsz, h, t, dk = q.shape
    dv = v.shape[-1]
    c = max(1, min(chunk_size, t))
    nc = -(-t // c)
    # padding: zero keys/values and a log input gate of -inf add nothing; log forget 0 keeps the state
    qc, kc, vc, lfc = (to_chunks(x, nc, c) for x in (q * scale, k, v, lf[..., None]))
    igc = to_chunks(ig[..., None], nc, c, value=float("-inf"))
    lfc, igc = lfc[..., 0], igc[..., 0]  # (B, H, N, C)
    b = torch.cumsum(lfc, dim=-1)
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    log_w = (b[..., :, None] - b[..., None, :] + igc[..., None, :]).masked_fill(~causal, float("-inf"))
    m_intra = log_w.amax(-1)  # (B, H, N, C): the diagonal is always there, so finite unless padding
    m_intra = torch.where(torch.isfinite(m_intra), m_intra, torch.zeros_like(m_intra))
    scores = (qc @ kc.transpose(-1, -2)) * torch.exp(log_w - m_intra[..., None])
    num_intra, den_intra = scores @ vc, scores.sum(-1)

    # the state entering each chunk (scaled by exp(-m)), one update per chunk
    u = b[..., -1:] - b + igc  # log weight of each key at the chunk's end
    u_max = u.amax(-1)
    u_max = torch.where(torch.isfinite(u_max), u_max, torch.full_like(u_max, -1e30))
    cs, ns, ms = _empty(q, v) if initial_state is None else initial_state
    c_in, n_in, m_in = [], [], []
    # per-chunk tensors by unbind, not indexing (ops/chunking.py)
    for b_end, u_i, u_max_i, k_i, v_i in zip(b[..., -1].unbind(2), u.unbind(2), u_max.unbind(2), kc.unbind(2),
                                            vc.unbind(2)):
        c_in.append(cs), n_in.append(ns), m_in.append(ms)
        decay = b_end + ms
        m_new = torch.maximum(decay, u_max_i)
        kw = k_i * torch.exp(u_i - m_new[..., None])[..., None]  # (B, H, C, Dk), weights <= 1
        carry = torch.exp(decay - m_new)
        cs = carry[..., None, None] * cs + kw.transpose(-1, -2) @ v_i
        ns = carry[..., None] * ns + kw.sum(-2)
        ms = m_new
    c_in, n_in, m_in = torch.stack(c_in, 2), torch.stack(n_in, 2), torch.stack(m_in, 2)  # (B, H, N, ...)

    # combine: each query's maximum over the carried state's weight and its intra-chunk weights
    a = b + m_in[..., None]  # (B, H, N, C)
    m = torch.maximum(a, m_intra)
    from_state, from_chunk = torch.exp(a - m), torch.exp(m_intra - m)
    num = from_chunk[..., None] * num_intra + from_state[..., None] * (qc @ c_in)
    den = from_chunk * den_intra + from_state * (qc @ n_in[..., None])[..., 0]
    out = num / torch.maximum(den.abs(), torch.exp(-m))[..., None]
    return out.reshape(bsz, h, nc * c, dv)[:, :, :t], (cs, ns, ms)
