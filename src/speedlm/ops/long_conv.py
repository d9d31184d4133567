"""Causal long convolution over time (Hyena's implicit filters, any filter as long as the
sequence), with an explicit history for incremental decoding.

u (B, T, D) inputs; h (D, L) taps, L >= S + T; history (B, S, D): the S inputs before u[:, 0];
bias (D,): the skip term. Channel d's output, over u_full = [history, u]:

    y[t] = sum_{s <= t} h[d, t - s] * u_full[s, d]  (+ bias[d] * u[t, d])

and only the last T positions (those of u) are returned.

The fast form multiplies spectra: the product of two length-n DFTs is the CIRCULAR convolution
of size n, in which output t also collects the terms of index t + n, t + 2n, ... of the linear
convolution. Zero-padding both the N = S + T inputs and their N taps to n >= 2N makes those
terms vanish: the linear convolution of two length-N sequences has 2N - 1 terms, so index
t + n >= 2N lies past its end for every t >= 0. Without the padding (n = N) the last inputs
would wrap around into the first outputs, which is exactly what a causal convolution must
never do.
"""

from __future__ import annotations

import torch


def fft_size(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n: sizes pocketfft and cuFFT transform fastest."""
    best = 1 << max(n - 1, 0).bit_length()  # the next power of two is always a candidate
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    # float64 stays float64; float32, bf16 and half compute in float32 (FFTs of bf16 are
    # unsupported on CPU and far too coarse anyway)
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def fft_causal_conv(
    u: torch.Tensor,
    h: torch.Tensor,
    bias: torch.Tensor | None = None,
    history: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fast form: rfft / irfft at a zero-padded size n >= 2 (S + T); O((S + T) log(S + T)) per
    channel. u (B, T, D), h (D, L >= S + T), bias (D,), history (B, S, D) -> (B, T, D) in u's dtype."""
    t = u.shape[1]
    full = u if history is None or history.shape[1] == 0 else torch.cat([history.to(u.dtype), u], dim=1)
    n_in = full.shape[1]
    assert h.shape[-1] >= n_in, f"filter of {h.shape[-1]} taps is shorter than the {n_in} inputs it must reach"
    dt = _compute_dtype(u, h)
    n = fft_size(2 * n_in)
    u_f = torch.fft.rfft(full.transpose(1, 2).to(dt), n=n)  # (B, D, n // 2 + 1)
    h_f = torch.fft.rfft(h[:, :n_in].to(dt), n=n)  # (D, n // 2 + 1)
    y = torch.fft.irfft(u_f * h_f, n=n)[..., n_in - t : n_in].transpose(1, 2)  # (B, T, D)
    if bias is not None:
        y = y + bias.to(dt) * u.to(dt)
    return y.to(u.dtype)


def long_conv_step(
    u: torch.Tensor,
    h0: torch.Tensor,
    h_back: torch.Tensor,
    bias: torch.Tensor | None = None,
    history: torch.Tensor | None = None,
) -> torch.Tensor:
    """One new position after S cached inputs (a decoding step), O(S) per channel with no copy of
    the history: y = h[0] u + sum_s h[S - s] history[s] (+ bias u). u (B, 1, D); h0 (D,) the
    filter's tap 0; h_back (D, S) the taps h[S], ..., h[1] (the filter reversed, a slice of it);
    history (B, S, D) -> (B, 1, D)."""
    dt = _compute_dtype(u, h0)
    y = h0.to(dt) * u.to(dt)
    if history is not None and history.shape[1]:
        # multiply and sum over s (einsum here turns into D tiny matmuls with a copy each)
        y = y + (history.to(dt) * h_back.to(dt).t()).sum(1, keepdim=True)
    if bias is not None:
        y = y + bias.to(dt) * u.to(dt)
    return y.to(u.dtype)


def direct_causal_conv_reference(u: torch.Tensor, h: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Naive form: the sum over past inputs written out, one output position at a time (no
    history; run it in float64). u (B, T, D), h (D, L >= T) -> (B, T, D)."""
    outs = []
    for t in range(u.shape[1]):
        taps = h[:, : t + 1].flip(-1)  # taps[d, s] = h[d, t - s]
        y = (u[:, : t + 1] * taps.t()[None]).sum(dim=1)
        outs.append(y if bias is None else y + bias * u[:, t])
    return torch.stack(outs, dim=1)
