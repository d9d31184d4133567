"""Element-wise gated linear recurrence (HGRN, Qin et al. 2023, arXiv:2311.04823):

    h_t = exp(g_t) * h_{t-1} + x_t          state (B, D): one number per channel

x (B, T, D) the gated input, g (B, T, D) log forget gates <= 0, initial_state (B, D) or None;
every form returns (h for every t, final state).

The chunk-parallel form needs no matrix products (the state is a vector). Time is cut into N
chunks of C tokens that all advance together: C steps, each one multiply-add over every chunk
at once, give each chunk's end state from a zero start; a Hillis-Steele scan over the N chunks
composes the pairs (a, b) -> (a' a, a' b + b') in log2(N) doubling steps (all factors products
of decays <= 1: nothing overflows) and gives the state entering every chunk; C more steps from
those states give every output. The loops run 2C + log2(N) elementwise steps whatever T is, on
tensors of N x D, against T steps on tensors of D for the token-by-token recurrence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from speedlm.ops import fla
from speedlm.ops.dispatch import Dispatch


def hgrn_recurrent(x, g, initial_state: torch.Tensor | None = None):
    """Naive reference: one token at a time (run it in float64)."""
    h = x.new_zeros(x.shape[0], x.shape[2]) if initial_state is None else initial_state
    outs = []
    for t in range(x.shape[1]):
        h = torch.exp(g[:, t]) * h + x[:, t]
        outs.append(h)
    return torch.stack(outs, dim=1), h


def _scan(a: torch.Tensor, b: torch.Tensor, dim: int):
    """Inclusive scan of h -> a h + b along `dim`: returns (A, B) with h_t = A_t h_0 + B_t."""
    n = a.shape[dim]
    shift = 1
    while shift < n:
        a_prev = F.pad(a.narrow(dim, 0, n - shift), _pad_spec(a, dim, shift), value=1.0)
        b_prev = F.pad(b.narrow(dim, 0, n - shift), _pad_spec(b, dim, shift), value=0.0)
        a, b = a * a_prev, a * b_prev + b
        shift *= 2
    return a, b


def _pad_spec(x: torch.Tensor, dim: int, front: int) -> tuple[int, ...]:
    """F.pad spec that adds `front` entries before index 0 of `dim`."""
    dim = dim % x.dim()
    spec = [0, 0] * (x.dim() - dim)
    spec[-2] = front
    return tuple(spec)


def hgrn_chunked(x, g, initial_state: torch.Tensor | None = None, chunk_size: int = 64):
    """Chunk-parallel form (see module doc): exact for any length and chunk size."""
    bsz, t, d = x.shape
    h0 = x.new_zeros(bsz, d) if initial_state is None else initial_state
    if t == 1:
        h = torch.exp(g[:, 0]) * h0 + x[:, 0]
        return h[:, None], h
    c = max(1, min(chunk_size, t))
    n = -(-t // c)
    pad = n * c - t
    # padding: zero input and zero log gate keep the state
    xc = (F.pad(x, (0, 0, 0, pad)) if pad else x).reshape(bsz, n, c, d)
    gc = (F.pad(g, (0, 0, 0, pad)) if pad else g).reshape(bsz, n, c, d)
    ac = torch.exp(gc)
    # pass 1: every chunk's end state from a zero start, all chunks at once
    h = x.new_zeros(bsz, n, d)
    xs, as_ = xc.unbind(2), ac.unbind(2)  # unbind, not indexing: see ops/chunking.py
    for x_j, a_j in zip(xs, as_):
        h = torch.addcmul(x_j, a_j, h)
    # the state entering each chunk: a scan over the chunks' (total decay, end state) pairs
    p, q = _scan(torch.exp(gc.sum(dim=2)), h, dim=1)  # state after chunk i = p_i h0 + q_i
    after = p * h0[:, None] + q  # (B, N, D)
    entry = torch.cat([h0[:, None], after[:, :-1]], dim=1)
    # pass 2: the recurrence again from the right entry states, keeping every step
    h, outs = entry, []
    for x_j, a_j in zip(xs, as_):
        h = torch.addcmul(x_j, a_j, h)
        outs.append(h)
    return torch.stack(outs, dim=2).reshape(bsz, n * c, d)[:, :t], after[:, -1]


# one dispatch: the torch form everywhere; fla's Triton kernels on CUDA when `fla-core` is installed
HGRN = Dispatch("element-wise recurrence", "torch", hgrn_chunked)
HGRN.register("fla", fla.hgrn, usable=fla.fla_usable)
