"""Mamba-2's state-space duality (SSD, Dao & Gu 2024, arXiv:2405.21060): a selective scan whose
decay is one scalar per head, which makes each chunk a few matrix products.

    h_t = exp(dt_t[h] A[h]) h_{t-1} + dt_t[h] x_t[h] B_t[g]^T        state (B, H, P, N)
    y_t[h] = h_t C_t[g]                                                 g = the head's group

x (B, T, H, P); dt (B, T, H) positive (softplus and bias applied); A (H,) negative; B, C
(B, T, G, N) with H divisible by G (heads h = g * H/G ... (g + 1) * H/G - 1 share group g's B
and C, as mamba-ssm lays them out); initial_state (B, H, P, N) or None. Every form returns
(y, final_state); the D skip term, the gate and the norm belong to the mixer.

The chunked algorithm, in the paper's four steps, with a_t = dt_t A the log decay and
b_t its cumulative sum inside a chunk:
  1. diagonal blocks: within each chunk, y = ((C B^T) * L) (dt x) with the decay matrix
     L[t, s] = exp(b_t - b_s) for s <= t (computed from differences: never overflows);
  2. chunk states: what each chunk leaves in the state, (dt x * exp(b_last - b))^T B;
  3. inter-chunk recurrence: the state entering chunk i, one (P, N) update per chunk;
  4. state to output: y += exp(b_t) C_t^T h_entering.
C B^T is computed once per group, not per head. Exact for any length and chunk size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from speedlm.ops import fla, mamba_kernels
from speedlm.ops.chunking import in_segments, num_chunks
from speedlm.ops.dispatch import Dispatch
from speedlm.ops.gla import gla_chunked, scalar_decay_scores


# every chunk's tensors are built at once, so the working set grows with T: longer sequences run
# in segments of this many tokens with the state carried (time linear in T past the CPU caches)
SEGMENT = 2048


def _zero_state(x, B):
    b, _, h, p = x.shape
    return x.new_zeros(b, h, p, B.shape[-1])


def _group_of_heads(x, B):
    """Broadcast index: (B, T, G, N) -> (B, T, H, N) by repeating each group over its heads."""
    r = x.shape[2] // B.shape[2]
    return B.repeat_interleave(r, dim=2) if r > 1 else B


def ssd_recurrent(x, dt, A, B, C, initial_state: torch.Tensor | None = None):
    """Naive reference: the recurrence above, one token at a time (run it in float64)."""
    h = _zero_state(x, B) if initial_state is None else initial_state
    Bh, Ch = _group_of_heads(x, B), _group_of_heads(x, C)
    ys = []
    for t in range(x.shape[1]):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]  # (B, H, 1, 1)
        h = decay * h + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, Ch[:, t]))
    return torch.stack(ys, dim=1), h


def ssd_step(x, dt, A, B, C, initial_state: torch.Tensor | None = None):
    """One token (T == 1): the recurrence itself."""
    h = _zero_state(x, B) if initial_state is None else initial_state
    Bh, Ch = _group_of_heads(x, B)[:, 0], _group_of_heads(x, C)[:, 0]  # (B, H, N)
    decay = torch.exp(dt[:, 0] * A)[:, :, None, None]
    h = torch.addcmul(decay * h, (dt[:, 0, :, None] * x[:, 0])[..., None], Bh[:, :, None, :])
    return (h @ Ch[..., None])[..., 0][:, None], h


def ssd_chunked(x, dt, A, B, C, initial_state: torch.Tensor | None = None, chunk_size: int = 64,
                segment: int = SEGMENT):
    """The SSD chunked algorithm (see module doc); sequences longer than `segment` run segment by
    segment with the state carried (ops/chunking.py `in_segments`)."""
    bsz, t, nh, p = x.shape
    if t == 1:
        return ssd_step(x, dt, A, B, C, initial_state)
    if t > segment:
        def part(x_, dt_, b_, c_, s):
            return ssd_chunked(x_, dt_, A, b_, c_, s, chunk_size, segment)

        return in_segments(part, [x, dt, B, C], segment, initial_state)
    ng, n = B.shape[2], B.shape[3]
    r = nh // ng
    c, nc = num_chunks(t, chunk_size)
    pad = nc * c - t

    def chunks(z):  # (B, T, ...) -> (B, N_c, C, ...); zero dt pads: no decay, no input
        z = F.pad(z, (0, 0) * (z.dim() - 2) + (0, pad)) if pad else z
        return z.reshape(bsz, nc, c, *z.shape[2:])

    # layout (B, G, R, N_c, C, .): heads split into their groups, so B and C broadcast over R
    xs = (chunks(x * dt[..., None]).view(bsz, nc, c, ng, r, p).permute(0, 3, 4, 1, 2, 5))  # dt x
    a = chunks(dt * A).view(bsz, nc, c, ng, r).permute(0, 3, 4, 1, 2)  # (B, G, R, N_c, C)
    Bc = chunks(B).permute(0, 3, 1, 2, 4)[:, :, None]  # (B, G, 1, N_c, C, N)
    Cc = chunks(C).permute(0, 3, 1, 2, 4)[:, :, None]
    b = torch.cumsum(a, dim=-1)
    b_last = b[..., -1:]

    # 1. diagonal blocks: (C B^T) * L, the scores of GLA with one decay per head
    y = scalar_decay_scores(Cc, Bc, b) @ xs  # (B, G, R, N_c, C, P)
    # 2. chunk states
    states = (xs * torch.exp(b_last - b)[..., None]).transpose(-1, -2) @ Bc  # (B, G, R, N_c, P, N)
    # 3. inter-chunk recurrence (unbind, not indexing: see ops/chunking.py)
    s = _zero_state(x, B) if initial_state is None else initial_state
    s = s.view(bsz, ng, r, p, n)
    entering = []
    for decay_i, state_i in zip(torch.exp(b_last[..., 0]).unbind(3), states.unbind(3)):
        entering.append(s)
        s = decay_i[..., None, None] * s + state_i
    h_in = torch.stack(entering, dim=3)  # (B, G, R, N_c, P, N)
    # 4. state to output
    y = y + (Cc @ h_in.transpose(-1, -2)) * torch.exp(b)[..., None]
    y = y.permute(0, 3, 4, 1, 2, 5).reshape(bsz, nc * c, nh, p)[:, :t]
    return y, s.reshape(bsz, nh, p, n)


def ssd_as_gla(x, dt, A, B, C, initial_state: torch.Tensor | None = None, chunk_size: int = 64, gla=gla_chunked):
    """SSD is gated linear attention with one decay per head: queries C, keys B, values dt x,
    log decay dt A, scale 1, state transposed ((Dk, Dv) = (N, P)). Runs `gla` (the torch form, or
    fla's `chunk_simple_gla` behind the "fla" backend) in that layout; the mapping itself is
    tested on CPU against the sequential reference."""
    q = _group_of_heads(x, C).transpose(1, 2)  # (B, H, T, N)
    k = _group_of_heads(x, B).transpose(1, 2)
    v = (x * dt[..., None]).transpose(1, 2)  # (B, H, T, P)
    g = (dt * A).transpose(1, 2)[..., None]  # (B, H, T, 1)
    s0 = None if initial_state is None else initial_state.transpose(-1, -2)
    o, s = gla(q, k, v, g, scale=1.0, initial_state=s0, chunk_size=chunk_size)
    return o.transpose(1, 2), s.transpose(-1, -2)


def _ssd_via_fla(x, dt, A, B, C, initial_state=None, chunk_size: int = 64):
    return ssd_as_gla(x, dt, A, B, C, initial_state, chunk_size, gla=fla.gla)


# one dispatch: the torch form everywhere; on CUDA mamba-ssm's Triton kernels when installed,
# else fla-core's simple-GLA kernel (the same recurrence, see ssd_as_gla)
SSD = Dispatch("state-space duality", "torch", ssd_chunked)
SSD.register("mamba-ssm", mamba_kernels.ssd, usable=mamba_kernels.ssd_usable)
SSD.register("fla", _ssd_via_fla, usable=fla.fla_usable)
