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
import torch.nn.functional as F

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
    """Chunked, stabilised prefix-sum form (see module doc): exact, causal, no loop over time."""
    b, h, t, m = kf.shape
    dv = v.shape[-1]
    c = max(1, min(chunk_size, t))
    n = -(-t // c)
    pad = n * c - t
    if initial_state is None:
        s0, z0 = kf.new_zeros(b, h, m, dv), kf.new_zeros(b, h, m)
        m0 = torch.full((b, h), float("-inf"), dtype=kf.dtype, device=kf.device)
    else:
        s0, z0, m0 = initial_state
    # padded keys: zero features, log scale -inf: they weigh nothing and never raise the maximum
    qc, kc, vc = (F.pad(x, (0, 0, 0, pad)).view(b, h, n, c, x.shape[-1]) for x in (qf, kf, v))
    ac = F.pad(ka, (0, pad), value=float("-inf")).view(b, h, n, c)
    # running maximum over every key so far (the state's included): causal by construction
    run = torch.cummax(ac.reshape(b, h, n * c), dim=-1).values.view(b, h, n, c)
    run = torch.maximum(run, m0[..., None, None])
    entry = torch.cat([m0[..., None], run[..., :-1, -1]], dim=-1)  # (B, H, N): max entering each chunk

    causal = torch.ones(c, c, dtype=torch.bool, device=kf.device).tril()
    weight = torch.exp((ac[..., None, :] - run[..., :, None]).masked_fill(~causal, float("-inf")))  # (.., C, C) <= 1
    scores = (qc @ kc.transpose(-1, -2)) * weight
    num, den = scores @ vc, scores.sum(-1)

    # chunk sums scaled to the maximum at the chunk's end, then carried with one rescale per chunk
    end = run[..., -1]  # (B, H, N)
    k_end = kc * torch.exp(ac - end[..., None])[..., None]
    chunk_s, chunk_z = k_end.transpose(-1, -2) @ vc, k_end.sum(dim=3)
    s, z, mx = s0, z0, m0
    states_s, states_z = [], []
    for i in range(n):  # one rescale-and-add per chunk
        states_s.append(s)
        states_z.append(z)
        shrink = torch.exp(mx - end[..., i]).nan_to_num(0.0)  # exp(-inf - finite) = 0; both -inf: empty
        s = shrink[..., None, None] * s + chunk_s[:, :, i]
        z = shrink[..., None] * z + chunk_z[:, :, i]
        mx = end[..., i]
    s_in, z_in = torch.stack(states_s, dim=2), torch.stack(states_z, dim=2)
    carry = torch.exp(entry[..., None] - run).nan_to_num(0.0)  # (B, H, N, C): state scale -> row scale
    num = num + carry[..., None] * (qc @ s_in)
    den = den + carry * (qc * z_in[:, :, :, None, :]).sum(-1)
    out = (num / den.clamp_min(_TINY)[..., None]).reshape(b, h, n * c, dv)[:, :, :t]
    return out, (s, z, mx)


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
