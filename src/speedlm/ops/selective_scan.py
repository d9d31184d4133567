"""Mamba's selective scan (Gu & Dao 2023, arXiv:2312.00752): a diagonal linear recurrence whose
decay and input map depend on the token.

    h_t = exp(delta_t[d] A[d, n]) h_{t-1}[d, n] + delta_t[d] B_t[n] u_t[d]      state (B, D, N)
    y_t[d] = sum_n C_t[n] h_t[d, n]

u, delta (B, T, D) (delta already positive: softplus with its bias applied); A (D, N) negative;
B, C (B, T, N), shared by every channel; initial_state (B, D, N) or None. Every form returns
(y, final_state); the D skip term and the z gate belong to the mixer.

Why not the matrix-product chunked form Mamba-2 uses: there the decay is one scalar per head,
so inside a chunk the decays factor out of C B^T and the chunk is a few matmuls (ops/ssd.py).
Here every (channel, state) pair has its own decay exp(delta[d] A[d, n]), so a chunk's decay
matrix is (D, N, C, C): measured on 2 CPU cores at D = 512, N = 16, T = 2048 that form (with
log-space cumulative decays and a cumsum) took 980 ms against 170 ms for the sequential loop,
and any factorisation exp(l_t) exp(-l_s) overflows float32 once a chunk's decay passes e^-88,
which a large delta reaches in a few tokens. The state is D x N numbers per token whatever the
method, so the work is element-wise; what the sequential loop wastes is T small steps. The
chunk-parallel form below advances all N_c = T / C chunks together: C steps give every chunk's
end state from zero, a cheap loop over the chunk ends gives the state entering each chunk (all
factors are decays <= 1: nothing overflows, exact for any delta), and C more steps from those
states give every output. 2C + N_c steps on (N_c, D, N) tensors instead of T steps on (D, N),
and no (T, D, N) tensor of states is ever held.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from speedlm.ops import mamba_kernels
from speedlm.ops.chunking import num_chunks
from speedlm.ops.dispatch import Dispatch


def _zero_state(u, a):
    return u.new_zeros(u.shape[0], u.shape[2], a.shape[1])


def selective_scan_recurrent(u, delta, A, B, C, initial_state: torch.Tensor | None = None):
    """Naive reference: the recurrence above, one token at a time (run it in float64)."""
    h = _zero_state(u, A) if initial_state is None else initial_state
    ys = []
    for t in range(u.shape[1]):
        h = torch.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * u[:, t])[:, :, None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1))
    return torch.stack(ys, dim=1), h


def selective_scan_step(u, delta, A, B, C, initial_state: torch.Tensor | None = None):
    """One token (T == 1): the recurrence itself."""
    h = _zero_state(u, A) if initial_state is None else initial_state
    h = torch.addcmul((delta[:, 0] * u[:, 0])[:, :, None] * B[:, 0, None, :], torch.exp(delta[:, 0, :, None] * A), h)
    return torch.bmm(h, C[:, 0, :, None]).transpose(1, 2), h


def selective_scan_chunked(u, delta, A, B, C, initial_state: torch.Tensor | None = None, chunk_size: int = 32):
    """Chunk-parallel form (see module doc): exact for any length, chunk size and delta."""
    bsz, t, d = u.shape
    if t == 1:
        return selective_scan_step(u, delta, A, B, C, initial_state)
    n_state = A.shape[1]
    c, nc = num_chunks(t, chunk_size)
    pad = nc * c - t

    def chunks(x):  # (B, T, F) -> C tensors of (B * N_c, F); zero delta and input padding keep the state
        x = F.pad(x, (0, 0, 0, pad)) if pad else x
        return x.reshape(bsz * nc, c, x.shape[-1]).unbind(1)  # unbind, not indexing: ops/chunking.py

    deltas = [x[:, :, None] for x in chunks(delta)]  # (B N_c, D, 1)
    inputs = [x[:, :, None] for x in chunks(delta * u)]
    bs = [x[:, None, :] for x in chunks(B)]  # (B N_c, 1, N)
    cs = [x[:, :, None] for x in chunks(C)]  # (B N_c, N, 1)

    # pass 1: each chunk's end state from a zero start, all chunks at once
    h = u.new_zeros(bsz * nc, d, n_state)
    for dl, x, b in zip(deltas, inputs, bs):
        h = torch.addcmul(x * b, torch.exp(dl * A), h)
    ends = h.reshape(bsz, nc, d, n_state).unbind(1)
    # the state entering each chunk: one update per chunk with the chunk's total decay
    padded = F.pad(delta, (0, 0, 0, pad)) if pad else delta
    chunk_log_decay = padded.reshape(bsz, nc, c, d).sum(2)[..., None] * A  # (B, N_c, D, N)
    s = _zero_state(u, A) if initial_state is None else initial_state
    entering = []
    for decay_i, end_i in zip(torch.exp(chunk_log_decay).unbind(1), ends):
        entering.append(s)
        s = torch.addcmul(end_i, decay_i, s)
    # pass 2: the recurrence again from the right entry states, reading out every step
    h = torch.stack(entering, dim=1).reshape(bsz * nc, d, n_state)
    ys = []
    for dl, x, b, cc in zip(deltas, inputs, bs, cs):
        h = torch.addcmul(x * b, torch.exp(dl * A), h)
        ys.append(torch.bmm(h, cc))  # (B N_c, D, 1)
    y = torch.cat(ys, dim=2).reshape(bsz, nc, d, c).transpose(2, 3).reshape(bsz, nc * c, d)
    return y[:, :t], s


# one dispatch: the torch form everywhere; mamba-ssm's CUDA kernel when it is installed and the
# call starts from an empty state (its selective_scan_fn takes no initial state)
SELECTIVE_SCAN = Dispatch("selective scan", "torch", selective_scan_chunked)
SELECTIVE_SCAN.register("mamba-ssm", mamba_kernels.selective_scan, usable=mamba_kernels.selective_scan_usable)
