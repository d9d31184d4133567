"""Causal linear attention (Katharopoulos et al. 2020, "Transformers are RNNs").

With a positive feature map phi (elu + 1), softmax attention is replaced by

    S_t = S_{t-1} + phi(k_t) v_t^T          (B, H, Dk, Dv) matrix state
    z_t = z_{t-1} + phi(k_t)                (B, H, Dk)     normaliser state
    o_t = phi(q_t)^T S_t / (phi(q_t)^T z_t + eps)

Inputs here are already feature-mapped: q, k (B, H, T, Dk), v (B, H, T, Dv).
State is the tuple (S, z). Both forms return (o, final_state).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

State = tuple[torch.Tensor, torch.Tensor]


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1.0


def zero_state(q: torch.Tensor, v: torch.Tensor) -> State:
    b, h, _, dk = q.shape
    return (q.new_zeros(b, h, dk, v.shape[-1]), q.new_zeros(b, h, dk))


def linear_attention_recurrent(q, k, v, initial_state: State | None = None, normalize: bool = True, eps: float = 1e-6):
    """Naive reference: one step per token, exactly the recurrence above."""
    s, z = zero_state(q, v) if initial_state is None else initial_state
    outs = []
    for t in range(q.shape[2]):
        s = s + k[:, :, t, :, None] * v[:, :, t, None, :]
        z = z + k[:, :, t]
        num = torch.einsum("bhk,bhkv->bhv", q[:, :, t], s)
        if normalize:
            num = num / (torch.einsum("bhk,bhk->bh", q[:, :, t], z)[..., None] + eps)
        outs.append(num)
    return torch.stack(outs, dim=2), (s, z)


def linear_attention_chunked(
    q, k, v, initial_state: State | None = None, normalize: bool = True, eps: float = 1e-6, chunk_size: int = 64
):
    """Chunked parallel form: exact, no loop over time.

    Inside a chunk of C tokens the causal part is a masked (C x C) product; across chunks the
    state enters through an exclusive prefix sum of per-chunk k^T v. Cost O(T (C + Dv) Dk),
    memory O(T / C * Dk * Dv).
    """
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    c = max(1, min(chunk_size, t))
    n = -(-t // c)
    pad = n * c - t
    # zero-padding after the feature map adds nothing to any state or output
    qc, kc, vc = (F.pad(x, (0, 0, 0, pad)).view(b, h, n, c, x.shape[-1]) for x in (q, k, v))
    s0, z0 = zero_state(q, v) if initial_state is None else initial_state

    kv_chunk = kc.transpose(-1, -2) @ vc  # (B, H, N, Dk, Dv)
    k_chunk = kc.sum(dim=3)  # (B, H, N, Dk)
    s_incl = torch.cumsum(kv_chunk, dim=2)
    z_incl = torch.cumsum(k_chunk, dim=2)
    s_before = s0[:, :, None] + s_incl - kv_chunk
    z_before = z0[:, :, None] + z_incl - k_chunk

    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    scores = (qc @ kc.transpose(-1, -2)).masked_fill(~causal, 0.0)  # (B, H, N, C, C)
    num = qc @ s_before + scores @ vc
    if normalize:
        den = (qc * z_before[:, :, :, None, :]).sum(-1) + scores.sum(-1)
        num = num / (den[..., None] + eps)
    out = num.reshape(b, h, n * c, dv)[:, :, :t]
    return out, (s0 + s_incl[:, :, -1], z0 + z_incl[:, :, -1])


def linear_attention_bidirectional(q, k, v, normalize: bool = True, eps: float = 1e-6):
    """Non-causal form: every query sees every key, o_i = phi(q_i)^T S_T / (phi(q_i)^T z_T + eps),
    in O(T Dk Dv) with no (T, T) product."""
    s = k.transpose(-1, -2) @ v  # (B, H, Dk, Dv)
    num = q @ s
    if normalize:
        num = num / ((q * k.sum(dim=-2, keepdim=True)).sum(-1, keepdim=True) + eps)
    return num


def linear_attention_dense(q, k, v, causal: bool, normalize: bool = True, eps: float = 1e-6):
    """Reference for both modes: the explicit (T, T) matrix of feature products."""
    a = q @ k.transpose(-1, -2)
    if causal:
        t = q.shape[-2]
        a = a.masked_fill(~torch.ones(t, t, dtype=torch.bool, device=q.device).tril(), 0.0)
    num = a @ v
    return num / (a.sum(-1, keepdim=True) + eps) if normalize else num
