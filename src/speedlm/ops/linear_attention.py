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

from speedlm.ops.chunking import num_chunks, to_chunks
from speedlm.ops.common import zero_matrix_state

State = tuple[torch.Tensor, torch.Tensor]


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1.0


def zero_state(q: torch.Tensor, v: torch.Tensor) -> State:
    b, h, _, dk = q.shape
    return (zero_matrix_state(q, v), q.new_zeros(b, h, dk))


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

    Inside a chunk of C tokens the causal part is a masked (C x C) product; the state before the
    chunk enters through one (C x Dk) @ (Dk x Dv) product, carried from chunk to chunk with one
    addition each. The normaliser z rides along as one more value channel (v augmented with a
    column of ones, S with z), so numerator and denominator come out of the same products.
    Cost O(T (C + Dv) Dk); memory O(T C) for the intra-chunk scores.
    """
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    c, n = num_chunks(t, chunk_size)
    s0, z0 = zero_state(q, v) if initial_state is None else initial_state
    if normalize:
        v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
        s0 = torch.cat([s0, z0[..., None]], dim=-1)
    # zero-padding after the feature map adds nothing to any state or output
    qc, kc, vc = to_chunks(q, n, c), to_chunks(k, n, c), to_chunks(v, n, c)
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    scores = (qc @ kc.transpose(-1, -2)).masked_fill(~causal, 0.0)  # (B, H, N, C, C)
    intra = scores @ vc
    chunk_kv = kc.transpose(-1, -2) @ vc  # (B, H, N, Dk, Dv (+1))
    s, inter = s0, []
    # the carried state: one product and one addition per chunk (unbind: see ops/chunking.py)
    for q_i, kv in zip(qc.unbind(2), chunk_kv.unbind(2)):
        inter.append(q_i @ s)
        s = s + kv
    out = (intra + torch.stack(inter, dim=2)).reshape(b, h, n * c, -1)[:, :, :t]
    if not normalize:
        return out, (s, z0 + kc.sum(dim=(2, 3)))
    return out[..., :dv] / (out[..., dv:] + eps), (s[..., :dv], s[..., dv])


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
