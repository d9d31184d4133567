"""Gated linear attention: linear attention whose matrix state decays (RetNet, GLA, and the
decay of Gated DeltaNet / Mamba-2 in their own files).

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T          state (B, H, Dk, Dv)
    o_t = scale * S_t^T q_t

q, k (B, H, T, Dk); v (B, H, T, Dv); g (B, H, T, Dk) per key channel (GLA) or (B, H, T, 1)
one decay per head (RetNet's fixed gamma, data-dependent scalar gates): natural-log decays,
g <= 0. `initial_state` (B, H, Dk, Dv) or None; every form returns (o, final_state), so that
training, prefill, chunked prefill and decoding share one code path.

The chunked form cuts time into chunks of C tokens. Inside a chunk everything is matrix
products; between chunks only the state is carried, with one elementwise update per chunk:

    b_t   = cumulative log decay inside the chunk (inclusive)
    o_t   = scale * [(q_t * exp(b_t))^T S_0 + sum_{s<=t} (q_t . k_s exp(b_t - b_s)) v_s]
    S_C   = exp(b_C) * S_0 + sum_s (k_s exp(b_C - b_s)) v_s^T

Every exponent above is <= 0 except inside exp(b_t - b_s), the intra-chunk decay. For one
decay per head it is a (C, C) matrix computed from differences (never overflows). Per channel
it would be a (C, C, Dk) tensor; instead the chunk is cut into sub-blocks of 16: a pair of
different sub-blocks factorises through the boundary between them (both factors <= 1), and a
sub-block with itself through its first position, which in float32 is exact while every
per-step log decay is >= -LOG_DECAY_FLOOR (exp(16 * 5) < float32 max): the GLA mixer's gate
keeps to that floor.
"""

from __future__ import annotations

import torch

from speedlm.ops import fla
from speedlm.ops.chunking import to_chunks
from speedlm.ops.common import query_scale, zero_matrix_state
from speedlm.ops.dispatch import Dispatch

LOG_DECAY_FLOOR = 5.0  # per-channel chunked form: exact while g >= -5 per step (see module doc)
SUB_BLOCK = 16

State = torch.Tensor


def gla_recurrent(q, k, v, g, scale=None, initial_state: State | None = None):
    """Naive reference: the recurrence above, one token at a time (run it in float64)."""
    scale = query_scale(q, scale)
    s = zero_matrix_state(q, v) if initial_state is None else initial_state
    outs = []
    for t in range(q.shape[2]):
        s = torch.exp(g[:, :, t, :, None]) * s + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, :, t], s))
    return torch.stack(outs, dim=2), s


def gla_parallel(q, k, v, g, scale=None):
    """Quadratic reference for one decay per head (RetNet's parallel form): o = (Q K^T * D) V with
    D[t, s] = exp(b_t - b_s) for s <= t and 0 above the diagonal, b the cumulative log decay."""
    assert g.shape[-1] == 1, "the parallel form takes one decay per head"
    scale = query_scale(q, scale)
    b = torch.cumsum(g[..., 0], dim=-1)  # (B, H, T)
    t = q.shape[2]
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    decay = torch.exp((b[..., :, None] - b[..., None, :]).masked_fill(~causal, float("-inf")))
    return scale * ((q @ k.transpose(-1, -2)) * decay) @ v


def gla_step(q, k, v, g, scale=None, initial_state: State | None = None):
    """One token (T == 1): the recurrence itself, no chunk machinery."""
    scale = query_scale(q, scale)
    s = zero_matrix_state(q, v) if initial_state is None else initial_state
    s = torch.exp(g[:, :, 0, :, None]) * s + k[:, :, 0, :, None] * v[:, :, 0, None, :]
    return scale * torch.einsum("bhk,bhkv->bhv", q[:, :, 0], s)[:, :, None], s


def scalar_decay_scores(qc, kc, b):
    """(..., C, C) scores q_t . k_s exp(b_t - b_s), s <= t, for one decay per head; b (..., C)."""
    c = qc.shape[-2]
    causal = torch.ones(c, c, dtype=torch.bool, device=qc.device).tril()
    decay = torch.exp((b[..., :, None] - b[..., None, :]).masked_fill(~causal, float("-inf")))
    return (qc @ kc.transpose(-1, -2)) * decay


def _intra_channel(qc, kc, b, sub: int):
    """(..., C, C) scores sum_c q_tc k_sc exp(b_tc - b_sc), s <= t, per-channel decays b (..., C, Dk),
    through sub-blocks of `sub` tokens (see module doc)."""
    *lead, c, dk = qc.shape
    m = c // sub
    qs, ks, bs = (x.reshape(*lead, m, sub, dk) for x in (qc, kc, b))
    # a sub-block with itself: through its first position (exponents >= 0, bounded by the floor)
    first = bs[..., :1, :]
    diag = ((qs * torch.exp(bs - first)) @ (ks * torch.exp(first - bs)).transpose(-1, -2)).tril()  # (..., M, sub, sub)
    rows = []
    for i in range(m):
        parts = []
        if i:
            # sources in earlier sub-blocks: through r = b at the last token before block i,
            # so that both factors are <= 1
            r = bs[..., i - 1, -1:, :]  # (..., 1, Dk)
            q_i = qs[..., i, :, :] * torch.exp(bs[..., i, :, :] - r)
            k_before = kc[..., : i * sub, :] * torch.exp(r - b[..., : i * sub, :])
            parts.append(q_i @ k_before.transpose(-1, -2))  # (..., sub, i * sub)
        parts.append(diag[..., i, :, :])
        if i < m - 1:
            parts.append(qc.new_zeros(*lead, sub, c - (i + 1) * sub))
        rows.append(torch.cat(parts, dim=-1))
    return torch.cat(rows, dim=-2)


def gla_chunked(q, k, v, g, scale=None, initial_state: State | None = None, chunk_size: int = 64):
    """Chunked parallel form (see module doc): exact for any length and chunk size; memory
    O(T * C) for the intra-chunk scores plus O(T / C * Dk * Dv) for the chunk states."""
    if q.shape[2] == 1:
        return gla_step(q, k, v, g, scale, initial_state)
    scale = query_scale(q, scale)
    bsz, h, t, dk = q.shape
    dv = v.shape[-1]
    per_channel = g.shape[-1] != 1
    c = max(1, min(chunk_size, t))
    if per_channel and c > SUB_BLOCK:
        c = -(-c // SUB_BLOCK) * SUB_BLOCK  # whole sub-blocks
    sub = min(SUB_BLOCK, c)
    n = -(-t // c)
    # zero keys add nothing and zero log decays keep the state: padding is invisible
    qc, kc, vc, gc = (to_chunks(x, n, c) for x in (q, k, v, g))
    b = torch.cumsum(gc, dim=3)  # (B, H, N, C, Dk|1)
    b_last = b[:, :, :, -1:, :]  # (B, H, N, 1, Dk|1)

    if per_channel:
        if c % sub:
            sub = c  # a chunk shorter than one sub-block is one sub-block
        scores = _intra_channel(qc, kc, b, sub)
    else:
        scores = scalar_decay_scores(qc, kc, b[..., 0])
    o = scores @ vc  # (B, H, N, C, Dv)

    # what each chunk adds to the state, and the decay the state suffers across the chunk
    k_to_end = kc * torch.exp(b_last - b)  # (B, H, N, C, Dk), factors <= 1
    chunk_kv = k_to_end.transpose(-1, -2) @ vc  # (B, H, N, Dk, Dv)
    chunk_decay = torch.exp(b_last[:, :, :, 0, :])[..., None]  # (B, H, N, Dk|1, 1)
    q_decayed = qc * torch.exp(b)
    s = zero_matrix_state(q, v) if initial_state is None else initial_state
    inter = []
    # the carried state: one product and one update per chunk (unbind: see ops/chunking.py)
    for qd, decay_i, kv in zip(q_decayed.unbind(2), chunk_decay.unbind(2), chunk_kv.unbind(2)):
        inter.append(qd @ s)
        s = decay_i * s + kv
    o = o + torch.stack(inter, dim=2)
    out = (scale * o).reshape(bsz, h, n * c, dv)[:, :, :t]
    return out, s


# one dispatch: the torch form everywhere; fla's Triton kernels on CUDA when `fla-core` is installed
GLA = Dispatch("gated linear attention", "torch", gla_chunked)
GLA.register("fla", fla.gla, usable=fla.fla_usable)
