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
from speedlm.ops.chunking import in_segments, num_chunks
from speedlm.ops.dispatch import Dispatch


# the chunks advance together, so a step's tensors are (T / C) x D x N: past ~2k tokens they leave
# the CPU caches and time grows faster than T (mamba-small forward 8k -> 16k: x2.25); longer
# sequences run in segments of this many tokens with the state carried
SEGMENT = 2048


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


class _Chunks:
    """The scan's inputs cut into N_c chunks of C steps, as per-step lists of (B N_c, ...) views
    (unbind, not indexing: ops/chunking.py). Padding has zero delta and zero input: it keeps the
    state and adds nothing."""

    def __init__(self, u, delta, B, C, chunk_size):
        self.bsz, self.t, self.d = u.shape
        self.c, self.nc = num_chunks(self.t, chunk_size)
        self.pad = self.nc * self.c - self.t
        self.deltas = [x[:, :, None] for x in self.split(delta)]  # (B N_c, D, 1)
        self.inputs = [x[:, :, None] for x in self.split(delta * u)]  # delta * u, (B N_c, D, 1)
        self.bs = [x[:, None, :] for x in self.split(B)]  # (B N_c, 1, N)
        self.cs = [x[:, :, None] for x in self.split(C)]  # (B N_c, N, 1)
        padded = F.pad(delta, (0, 0, 0, self.pad)) if self.pad else delta
        self.delta_sums = padded.reshape(self.bsz, self.nc, self.c, self.d).sum(2)[..., None]  # (B, N_c, D, 1)

    def split(self, x):
        x = F.pad(x, (0, 0, 0, self.pad)) if self.pad else x
        return x.reshape(self.bsz * self.nc, self.c, x.shape[-1]).unbind(1)

    def unsplit(self, steps):
        """C per-step tensors (B N_c, F) -> (B, T, F)."""
        x = torch.stack(steps, dim=1).reshape(self.bsz, self.nc * self.c, -1)
        return x[:, : self.t]


def _advance(h, a, xb, dl, x, b, A):
    """One step of every chunk at once, in place: h <- exp(delta A) h + (delta u) B. Forward only
    (no autograd): the same three buffers serve every step instead of three fresh tensors (the
    speed-up over the loop measured 2.2-2.8x at 512 channels either way: the work is memory-bound)."""
    torch.mul(dl, A, out=a).exp_()
    torch.mul(x, b, out=xb)
    return h.mul_(a).add_(xb)


def _entering_states(ch: _Chunks, A, h0):
    """The state entering every chunk, (B N_c, D, N), and the final state: C steps give each
    chunk's end state from zero (all chunks at once), then one update per chunk carries them."""
    rows, n = ch.bsz * ch.nc, A.shape[1]
    a, xb, h = h0.new_empty(rows, ch.d, n), h0.new_empty(rows, ch.d, n), h0.new_zeros(rows, ch.d, n)
    for dl, x, b in zip(ch.deltas, ch.inputs, ch.bs):
        _advance(h, a, xb, dl, x, b, A)
    s, entering = h0, []
    for decay_i, end_i in zip(torch.exp(ch.delta_sums * A).unbind(1), h.view(ch.bsz, ch.nc, ch.d, -1).unbind(1)):
        entering.append(s)
        s = torch.addcmul(end_i, decay_i, s)
    return torch.stack(entering, dim=1).view(rows, ch.d, -1), s


class _ChunkedScan(torch.autograd.Function):
    """Forward: the chunk-parallel scan. Backward, written out rather than left to autograd
    (whose graph would hold ~6 (T, D, N) tensors, and whose thousands of saved per-step blocks
    fragment the CPU heap: 6 GB of resident memory for 0.9 GB of live tensors in mamba-small at
    2k tokens). With lam_t = dL/dh_t, the adjoint runs the same recurrence backwards,

        lam_t = gy_t C_t^T + a_{t+1} lam_{t+1},      a_t = exp(delta_t A),

    chunk-parallel like the forward: C reverse steps from zero give what each chunk sends to the
    one before, a loop over the chunks carries it, and C reverse steps from the right seeds give
    every lam_t, while the states h_t are recomputed from the saved chunk-entry states. Then
    dx_t = lam_t (x_t = delta_t u_t B_t), d log a_t = lam_t * h_{t-1} * a_t and dC_t = gy_t h_t."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, h0, chunk_size):
        ch = _Chunks(u, delta, B, C, chunk_size)
        entering, final = _entering_states(ch, A, h0)
        h, a, xb = entering.clone(), torch.empty_like(entering), torch.empty_like(entering)
        y = u.new_empty(ch.c, ch.bsz * ch.nc, ch.d)
        for j, (dl, x, b, cc) in enumerate(zip(ch.deltas, ch.inputs, ch.bs, ch.cs)):
            _advance(h, a, xb, dl, x, b, A)
            torch.bmm(h, cc, out=y[j].unsqueeze(-1))
        ctx.save_for_backward(u, delta, A, B, C, entering)
        ctx.chunk_size = chunk_size
        y = y.view(ch.c, ch.bsz, ch.nc, ch.d).permute(1, 2, 0, 3).reshape(ch.bsz, ch.nc * ch.c, ch.d)
        return y[:, : ch.t], final

    @staticmethod
    def backward(ctx, gy, g_final):
        u, delta, A, B, C, entering = ctx.saved_tensors
        ch = _Chunks(u, delta, B, C, ctx.chunk_size)
        gys = [g[:, :, None] for g in ch.split(gy)]  # (B N_c, D, 1)
        us = [x[:, :, None] for x in ch.split(u)]
        steps = range(ch.c - 1, -1, -1)
        # the decays and the states after every step of every chunk, recomputed into two buffers
        # (one segment's worth: selective_scan_chunked cuts long sequences first)
        decays, states = entering.new_empty(ch.c, *entering.shape), entering.new_empty(ch.c, *entering.shape)
        h = entering
        for j, (dl, x, b) in enumerate(zip(ch.deltas, ch.inputs, ch.bs)):
            torch.mul(dl, A, out=decays[j]).exp_()
            h = torch.addcmul(x * b, decays[j], h, out=states[j])
        # what each chunk's start sends back: C reverse steps from zero, all chunks at once
        lam = None
        for j in steps:
            g = gys[j] * ch.cs[j].transpose(1, 2)
            lam = g if lam is None else torch.addcmul(g, decays[j + 1], lam)
        sent = (decays[0] * lam).view(ch.bsz, ch.nc, ch.d, -1)
        # the seed of each chunk's last step: one update per chunk, from the last chunk back
        k, seeds = g_final, []
        for decay_i, sent_i in zip(reversed(torch.exp(ch.delta_sums * A).unbind(1)), reversed(sent.unbind(1))):
            seeds.append(k)
            k = torch.addcmul(sent_i, decay_i, k)
        g_h0 = k
        lam = torch.stack(seeds[::-1], dim=1).view(ch.bsz * ch.nc, ch.d, -1)
        # every lam_t, and the gradients read off it step by step
        g_a_log_delta = torch.zeros_like(entering)
        du, ddelta, dB, dC = [None] * ch.c, [None] * ch.c, [None] * ch.c, [None] * ch.c
        for j in steps:
            dl, b, a = ch.deltas[j], ch.bs[j], decays[j]
            g = gys[j] * ch.cs[j].transpose(1, 2)
            lam = g + lam if j == ch.c - 1 else torch.addcmul(g, decays[j + 1], lam)
            h_prev = states[j - 1] if j else entering
            s = torch.bmm(lam, b.transpose(1, 2))  # sum_n lam B: (B N_c, D, 1)
            g_log_a = lam * h_prev * a  # dL / d(delta A)
            du[j] = (dl * s)[..., 0]
            ddelta[j] = (us[j] * s + (g_log_a * A).sum(-1, keepdim=True))[..., 0]
            dB[j] = torch.bmm(ch.inputs[j].transpose(1, 2), lam)[:, 0]
            dC[j] = torch.bmm(gys[j].transpose(1, 2), states[j])[:, 0]
            g_a_log_delta.addcmul_(g_log_a, dl)
        return (ch.unsplit(du), ch.unsplit(ddelta), g_a_log_delta.sum(0), ch.unsplit(dB), ch.unsplit(dC),
                g_h0 if ctx.needs_input_grad[5] else None, None)


def selective_scan_chunked(u, delta, A, B, C, initial_state: torch.Tensor | None = None, chunk_size: int = 32,
                           segment: int = SEGMENT):
    """Chunk-parallel form (see module doc and `_ChunkedScan`): exact for any length, chunk size
    and delta, with a hand-written chunk-parallel backward. Sequences longer than `segment` run
    segment by segment with the state carried (ops/chunking.py `in_segments`)."""
    if u.shape[1] == 1:
        return selective_scan_step(u, delta, A, B, C, initial_state)
    if u.shape[1] > segment:
        def part(u_, d_, b_, c_, s):
            return selective_scan_chunked(u_, d_, A, b_, c_, s, chunk_size, segment)

        return in_segments(part, [u, delta, B, C], segment, initial_state)
    h0 = _zero_state(u, A) if initial_state is None else initial_state
    return _ChunkedScan.apply(u, delta, A, B, C, h0, chunk_size)


# Calls without gradients at least this long take the compiled CPU kernel under `auto`
# (ops/selective_scan_compiled.py): its first call compiles for 20-60 s on 2 cores (seconds once
# Inductor's on-disk cache holds it), which long-context inference repays; shorter calls (tests,
# tiny models, decoding) stay eager and compile nothing. Training stays eager too: the compiled
# forward + backward measured no faster than the eager form's.
COMPILE_MIN_LENGTH = 1024


def _compiled_usable(u, delta, A, B, C, *args, **kwargs) -> bool:
    from torch.utils._python_dispatch import is_in_torch_dispatch_mode

    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (u, delta, A, B, C))
    # a dispatch mode (FlopCounterMode, fake tensors) cannot see into the compiled `scan`: eager there
    return (u.device.type == "cpu" and u.shape[1] >= COMPILE_MIN_LENGTH and u.dtype in (torch.float32, torch.float64)
            and not needs_grad and not torch.compiler.is_compiling() and not is_in_torch_dispatch_mode())


def _compiled(*args, **kwargs):
    from speedlm.ops.selective_scan_compiled import selective_scan_compiled  # imports Inductor only when used

    return selective_scan_compiled(*args, **kwargs)


# one dispatch: the eager torch form everywhere; mamba-ssm's CUDA kernel when it is installed and
# the call starts from an empty state (its selective_scan_fn takes no initial state); on CPU the
# Inductor-compiled kernel for long sequences (ops/selective_scan_compiled.py), falling back to
# the eager form where it cannot build (ops/dispatch.py)
SELECTIVE_SCAN = Dispatch("selective scan", "torch", selective_scan_chunked)
SELECTIVE_SCAN.register("mamba-ssm", mamba_kernels.selective_scan, usable=mamba_kernels.selective_scan_usable)
SELECTIVE_SCAN.register("compiled", _compiled, usable=_compiled_usable)
