"""FAVOR+ (Performer, Choromanski et al. 2020, arXiv:2009.14794): softmax attention through
positive orthogonal random features, in causal prefix-sum form.

With x scaled by D^-1/4 and W (m, D) random rows, phi(x) = exp(W x - |x|^2 / 2) / sqrt(m) is
positive and E[phi(q) . phi(k)] = exp(q . k / sqrt(D)). Then

    o_t = sum_{s<=t} (phi(q_t) . phi(k_s)) v_s / sum_{s<=t} phi(q_t) . phi(k_s)

Stabiliser. exp(W x) overflows for large projections, so features are returned as
phi(x) = exp(a_x) * f(x) with f <= 1 and a_x = max_j (W x - |x|^2 / 2)_j, a per-token log
scale. A query's scale cancels between numerator and denominator and is dropped. A key's may
not (keys are weighted against each other), and it must not be replaced by a maximum over all
keys, which would let a key's features depend on later keys. Instead the sums carry the running
maximum m_t = max_{s<=t} a_s, online-softmax style: every term is stored as exp(a_s - m_t) f(k_s)
(<= 1) and the stored sums are rescaled by exp(m_old - m_new) (<= 1) when the maximum grows. The
result is exactly the unstabilised ratio, computed from earlier keys only.

Shapes: features qf, kf (B, H, T, m); key log scales ka (B, H, T); v (B, H, T, Dv). State:
(S (B, H, m, Dv), z (B, H, m), running max (B, H)); every form returns (o, final_state).
"""

from __future__ import annotations

import math

import torch

from speedlm.ops.chunking import num_chunks, to_chunks

State = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
_TINY = 1e-30  # denominators are sums of positive terms; this only guards an all-underflow row


def orthogonal_gaussian(m: int, d: int, generator: torch.Generator | None = None, dtype=torch.float32) -> torch.Tensor:
    """(m, d) random features: stacked d x d blocks with orthonormal rows (QR of a Gaussian
    matrix), each row rescaled to the norm of an independent Gaussian vector, so that every row
    is marginally N(0, I) while rows within a block are exactly orthogonal (FAVOR+, Lemma 1)."""
    blocks = []
    for _ in range(-(-m // d)):
        g = torch.randn(d, d, generator=generator, dtype=torch.float64)
        q, r = torch.linalg.qr(g)
        q = q * torch.sign(torch.diagonal(r))[None, :]  # a uniformly random orthogonal matrix
        blocks.append(q.t())
    w = torch.cat(blocks, dim=0)[:m]
    norms = torch.randn(m, d, generator=generator, dtype=torch.float64).norm(dim=1, keepdim=True)
    return (w * norms).to(dtype)


def favor_features(x: torch.Tensor, projection: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, H, T, D) -> (f (B, H, T, m) <= 1 / sqrt(m), log scale a (B, H, T)) with
    phi(x) = exp(a) * f. x is scaled by D^-1/4 here."""
    d, m = x.shape[-1], projection.shape[0]
    x = x * d**-0.25
    logits = x @ projection.t() - 0.5 * x.pow(2).sum(-1, keepdim=True)
    a = logits.amax(dim=-1)
    return torch.exp(logits - a[..., None]) / math.sqrt(m), a


def favor_recurrent(qf, kf, ka, v, initial_state: State | None = None):
    """Naive reference: the unstabilised prefix sums of phi(k) v^T and phi(k), one token at a
    time (run it in float64, where exp(a) stays finite)."""
    b, h, t, m = kf.shape
    if initial_state is None:
        s, z = kf.new_zeros(b, h, m, v.shape[-1]), kf.new_zeros(b, h, m)
    else:
        s0, z0, m0 = initial_state
        s, z = s0 * torch.exp(m0)[..., None, None], z0 * torch.exp(m0)[..., None]
    outs = []
    for i in range(t):
        k_true = torch.exp(ka[:, :, i])[..., None] * kf[:, :, i]
        s = s + k_true[..., :, None] * v[:, :, i, None, :]
        z = z + k_true
        num = torch.einsum("bhm,bhmv->bhv", qf[:, :, i], s)
        den = torch.einsum("bhm,bhm->bh", qf[:, :, i], z)
        outs.append(num / den.clamp_min(_TINY)[..., None])
    # report the state in the stabilised form the fast path carries: scaled by exp(-max a)
    mx = ka.amax(dim=2) if initial_state is None else torch.maximum(initial_state[2], ka.amax(dim=2))
    return torch.stack(outs, dim=2), (s * torch.exp(-mx)[..., None, None], z * torch.exp(-mx)[..., None], mx)


def favor_chunked(qf, kf, ka, v, initial_state: State | None = None, chunk_size: int = 64):
    """Chunked, stabilised prefix-sum form (see module doc): exact, causal, no loop over time.
    As in linear attention the normaliser rides along as one more value channel."""

    b, h, t, m = kf.shape
    dv = v.shape[-1]
    c, n = num_chunks(t, chunk_size)
    if initial_state is None:
        s0 = kf.new_zeros(b, h, m, dv + 1)
        m0 = torch.full((b, h), float("-inf"), dtype=kf.dtype, device=kf.device)
    else:
        s_in, z_in, m0 = initial_state
        s0 = torch.cat([s_in, z_in[..., None]], dim=-1)
    v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
    # padded keys: zero features, log scale -inf: they weigh nothing and never raise the maximum
    qc, kc, vc = to_chunks(qf, n, c), to_chunks(kf, n, c), to_chunks(v, n, c)
    ac = to_chunks(ka[..., None], n, c, value=float("-inf"))[..., 0]  # (B, H, N, C)
    # running maximum over every key so far (the state's included): causal by construction
    run = torch.maximum(torch.cummax(ac.reshape(b, h, n * c), dim=-1).values.view(b, h, n, c), m0[..., None, None])
    end = run[..., -1]  # (B, H, N): the maximum at each chunk's end
    entry = torch.cat([m0[..., None], end[..., :-1]], dim=-1)  # the maximum entering each chunk

    causal = torch.ones(c, c, dtype=torch.bool, device=kf.device).tril()
    weight = torch.exp((ac[..., None, :] - run[..., :, None]).masked_fill(~causal, float("-inf")))  # <= 1
    intra = ((qc @ kc.transpose(-1, -2)) * weight) @ vc
    # each chunk's sums scaled to the maximum at its end; the carried sums rescaled once per chunk
    chunk_s = (kc * torch.exp(ac - end[..., None])[..., None]).transpose(-1, -2) @ vc  # (B, H, N, m, Dv + 1)
    carry = torch.exp(entry[..., None] - run).nan_to_num(0.0)[..., None]  # state scale -> row scale, <= 1
    shrink = torch.exp(entry - end).nan_to_num(0.0)[..., None, None]  # exp(-inf - finite) = 0: empty state
    s, inter = s0, []
    for carry_i, q_i, shrink_i, s_i in zip(carry.unbind(2), qc.unbind(2), shrink.unbind(2), chunk_s.unbind(2)):
        inter.append(carry_i * (q_i @ s))  # unbind, not indexing: see ops/chunking.py
        s = shrink_i * s + s_i
    out = (intra + torch.stack(inter, dim=2)).reshape(b, h, n * c, dv + 1)[:, :, :t]
    out = out[..., :dv] / out[..., dv:].clamp_min(_TINY)
    return out, (s[..., :dv], s[..., dv], end[..., -1])


def favor_bidirectional(qf, kf, ka, v):
    """Every query sees every key: one global stabiliser is allowed here."""
    w = torch.exp(ka - ka.amax(dim=-1, keepdim=True))[..., None] * kf
    num = qf @ (w.transpose(-1, -2) @ v)
    den = (qf * w.sum(dim=-2, keepdim=True)).sum(-1, keepdim=True)
    return num / den.clamp_min(_TINY)


def favor_dense(qf, kf, ka, v, causal: bool):
    """Quadratic reference with the same features: the explicit (T, T) matrix of
    phi(q_t) . phi(k_s), masked; run it in float64."""
    a = (qf @ kf.transpose(-1, -2)) * torch.exp(ka)[..., None, :]
    if causal:
        t = qf.shape[-2]
        a = a.masked_fill(~torch.ones(t, t, dtype=torch.bool, device=qf.device).tril(), 0.0)
    return (a @ v) / a.sum(-1, keepdim=True).clamp_min(_TINY)
