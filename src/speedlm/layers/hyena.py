"""Hyena (Poli et al. 2023, Hyena Hierarchy, arXiv:2302.10866): long convolutions with
implicitly parametrised filters, interleaved with data-controlled gating.

Order N: N + 1 projections of the input, each passed through a short causal depthwise conv
(kernel 3), give the gates c_0 .. c_{N-1} and the value v. The recurrence of the paper
(Definition 3.1) runs N long convolutions, each followed by a gate:

    z_0 = v;   z_i = g_i * (h_i * z_{i-1} + b_i z_{i-1})  for i = 1 .. N;   y = W_o z_N

with the gates taken in safari's order: the chunk next to v first, c_0 last
(g_i = c_{N-i}). h_i * z is the causal long convolution of ops/long_conv.py and b_i its
per-channel skip term (the "D" of an SSM).

Filters. Each h_i is a function of position, not a table: a positional embedding z(t) of the
filter length L = dims.max_seq_len (t / (L - 1) and (emb_dim - 1) / 2 bands of cos / sin)
goes through an MLP with sine activations, and the result is windowed by a fixed exponential
decay (safari's ExponentialModulation; per-channel rates between fast_decay_pct=0.3 and
slow_decay_pct=1.5 of the length with target 1e-2, shift 0). Filter-count convention: one
implicit filter per channel and per order, N * d filters in all (no head sharing), the MLP's
last layer emitting all N * d of them at once.

How this relates to safari's HyenaOperator (HazyResearch/safari, num_heads=1): projections,
short conv, filter MLP (Linear -> Sin -> [Linear -> Sin] x inner_mlps -> Linear, one shared
learned frequency, w=1), modulation and skip terms (randn) are built the same way. Differences:
- safari's operator of order N runs N - 1 long convolutions and gates before each
  (y = c_0 * h_{N-1} * (... h_1 * (c_{N-1} * v))), i.e. the paper's recurrence with h_1 replaced
  by the identity; here order N runs the paper's N (safari's order N + 1 has the same number).
- projections have no bias (this library's convention; safari's have);
- the positional embedding is fixed (safari trains it with a learning rate of 1e-5);
- no dropout, no filter normalisation, no multi-head / block / outer-product variants;
- a sequence longer than the filter is refused (safari silently truncates it).

Decoding. Hyena has no recurrent form: the output at t reads every earlier input of every long
convolution. The cache keeps them (a TokenBuffer under the full policy per order, next to the
short conv's last inputs), so decoding is exact; the state is O(context) -- N * context * d
values per row -- and a decoded token costs O(context) per channel (one dot product with the
reversed filter). Prefill and chunked prefill go through the FFT over [cached, new] inputs.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from speedlm.cache.buffer import TokenBuffer
from speedlm.cache.composite import CompositeCache
from speedlm.cache.kv import FullPolicy
from speedlm.errors import SpeedlmError
from speedlm.layers.dims import ModelDims
from speedlm.layers.flops import Flops
from speedlm.layers.mixer import Mixer, SeqMeta, linear_flops
from speedlm.layers.short_conv import ShortConv
from speedlm.ops.long_conv import direct_causal_conv_reference, fft_causal_conv, fft_size, long_conv_step
from speedlm.registry import Range

# FLOPs of one real FFT of size n, ~ half a complex one's 5 n log2 n
_RFFT_FLOPS_PER_N_LOG2N = 2.5


class HyenaFilter(nn.Module):
    """`channels` implicit filters of length `max_len`, evaluated at positions 0 .. n - 1; plus
    their skip terms `bias` (channels,)."""

    def __init__(
        self,
        channels: int,
        max_len: int,
        emb_dim: int,
        width: int,
        inner_mlps: int,
        sin_freq: float,
        fast_decay_pct: float = 0.3,
        slow_decay_pct: float = 1.5,
        target: float = 1e-2,
    ):
        super().__init__()
        self.channels, self.max_len, self.emb_dim, self.sin_freq = channels, max_len, emb_dim, sin_freq
        self.linears = nn.ModuleList(
            [nn.Linear(emb_dim, width)]
            + [nn.Linear(width, width) for _ in range(inner_mlps)]
            + [nn.Linear(width, channels, bias=False)]
        )
        self.freq = nn.Parameter(torch.empty(width))  # one Sin shared by every activation, as safari's
        self.bias = nn.Parameter(torch.empty(channels))
        # decay rates of the window, fixed: fastest reaches `target` at fast_decay_pct of the length
        self.decay_range = (math.log(target) / slow_decay_pct, math.log(target) / fast_decay_pct)
        self._memo: tuple[tuple, torch.Tensor] | None = None
        self._rev_memo: tuple[torch.Tensor, torch.Tensor] | None = None  # (the memo it reverses, reversed)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in self.linears:
            lin.reset_parameters()  # nn.Linear's default, as safari leaves it
        with torch.no_grad():
            self.freq.fill_(self.sin_freq)
            self.bias.normal_()

    def _dtype(self) -> torch.dtype:
        # float64 models stay float64; float32 / bf16 / half evaluate the filter in float32
        return torch.float64 if self.freq.dtype == torch.float64 else torch.float32

    def compute(self, n: int) -> torch.Tensor:
        """(channels, n): the filters at positions 0 .. n - 1, without the memo."""
        dt, device = self._dtype(), self.freq.device
        k = torch.arange(n, device=device, dtype=torch.float64)
        t = (k / max(self.max_len - 1, 1))[:, None]  # (n, 1), 0 .. 1 over the whole filter length
        bands = (self.emb_dim - 1) // 2
        f = torch.linspace(1e-4, bands - 1, bands, device=device, dtype=torch.float64)
        angle = 2 * math.pi * k[:, None] / self.max_len * f  # (n, bands)
        z = torch.cat([t, torch.cos(angle), -torch.sin(angle)], dim=-1).to(dt)  # exp(-i f w): real, imag
        freq = self.freq.to(dt)
        for lin in self.linears[:-1]:
            z = torch.sin(freq * F.linear(z, lin.weight.to(dt), lin.bias.to(dt)))
        h = F.linear(z, self.linears[-1].weight.to(dt))  # (n, channels)
        rates = torch.linspace(*self.decay_range, self.channels, device=device, dtype=torch.float64).abs()
        window = torch.exp(-t * rates).to(dt)  # (n, channels)
        return (h * window).t()

    def forward(self, n: int) -> torch.Tensor:
        """(channels, n). Without autograd (inference, decoding) the filter is memoised: it is
        evaluated once at a doubling length and sliced, and re-evaluated when any parameter
        changes (in place: `_version`; moved or recast: `data_ptr`, device, dtype)."""
        params = list(self.parameters())
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return self.compute(n)
        key = tuple((p.data_ptr(), p._version, p.device, p.dtype) for p in params)
        if self._memo is None or self._memo[0] != key or self._memo[1].shape[-1] < n:
            have = 0 if self._memo is None or self._memo[0] != key else self._memo[1].shape[-1]
            self._memo = (key, self.compute(min(self.max_len, max(n, 2 * have))))
        return self._memo[1][:, :n]

    def reversed(self, n: int) -> torch.Tensor:
        """(channels, m >= n): the filters with time reversed, rev[:, m - 1 - j] = h[:, j], so that a
        decoding step after S inputs reads h[:, S - s] for s < S as the slice rev[:, m - 1 - S : m - 1]
        (no copy). Memoised with the filter while gradients are off."""
        h = self.forward(n)
        if self._memo is None or h.requires_grad:
            return h.flip(-1)
        key, full = self._memo
        if self._rev_memo is None or self._rev_memo[0] is not full:
            self._rev_memo = (full, full.flip(-1))
        return self._rev_memo[1]

    def flops_per_position(self) -> Flops:
        """The MLP (functional F.linear calls: matmul, not Linear modules) and, elementwise,
        sin(freq * .) and the window."""
        sines = sum(lin.out_features for lin in self.linears[:-1])
        return Flops(matmul=linear_flops(*self.linears), other=2.0 * sines + self.channels)


class Hyena(Mixer):
    residual_out = ("o_proj",)

    @classmethod
    def check_options(cls, dims: ModelDims, emb_dim: int = 33, **options) -> None:
        if emb_dim % 2 == 0:
            raise SpeedlmError(f"emb_dim must be odd (time, then cos and sin of each band), got {emb_dim}")

    def __init__(
        self,
        dims: ModelDims,
        order: Annotated[int, Range(min=1)] = 2,
        filter_order: Annotated[int, Range(min=1)] = 64,
        emb_dim: Annotated[int, Range(min=3)] = 33,
        inner_mlps: Annotated[int, Range(min=0)] = 2,
        short_kernel: Annotated[int, Range(min=1)] = 3,
        sin_freq: float = 1.0,
    ):
        super().__init__(dims)
        self.check_options(dims, emb_dim=emb_dim)
        d = dims.d_model
        self.order = order
        self.in_proj = nn.Linear(d, (order + 1) * d, bias=False)
        self.short_conv = ShortConv((order + 1) * d, short_kernel)
        self.filter = HyenaFilter(order * d, dims.max_seq_len, emb_dim, filter_order, inner_mlps, sin_freq)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()  # N(0, init_std) projections; the filter MLP is re-initialised below
        self.short_conv.reset_parameters()
        self.filter.reset_parameters()

    def _filters(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, d, n) taps and (N, d) skip terms, order-major like safari's '(o d)' layout."""
        d = self.dims.d_model
        return h.view(self.order, d, h.shape[-1]), self.filter.bias.view(self.order, d)

    def mix(self, x, meta: SeqMeta, cache: CompositeCache | None = None):
        t, n = x.shape[1], self.order
        u = self.short_conv(self.in_proj(x), None if cache is None else cache["conv"])
        *gates, v = u.chunk(n + 1, dim=-1)
        past = 0 if cache is None else cache["inputs_1"].length
        if past + t > self.dims.max_seq_len:
            raise SpeedlmError(
                f"Hyena's filters are max_seq_len={self.dims.max_seq_len} long; {past + t} tokens do not fit"
            )
        taps, bias = self._filters(self.filter(past + t))
        rev = self._filters(self.filter.reversed(past + 1))[0] if t == 1 and past else None
        for i in range(n):
            if cache is None:
                y = fft_causal_conv(v, taps[i], bias[i])
            else:
                buf = cache[f"inputs_{i + 1}"]
                history = buf.entries()[0] if buf.length else None
                if rev is not None:
                    # a decoding step: one dot product per channel with the reversed filter, O(past)
                    m = rev.shape[-1]
                    y = long_conv_step(v, taps[i][:, 0], rev[i][:, m - 1 - past : m - 1], bias[i], history)
                else:
                    y = fft_causal_conv(v, taps[i], bias[i], history)
                buf.extend(v)
            v = gates[n - 1 - i] * y
        return self.o_proj(v)

    def reference(self, x, meta: SeqMeta):
        n = self.order
        u = self.short_conv.reference(torch.einsum("btd,ed->bte", x, self.in_proj.weight))
        *gates, v = u.chunk(n + 1, dim=-1)
        taps, bias = self._filters(self.filter.compute(x.shape[1]).to(x.dtype))
        for i in range(n):
            v = gates[n - 1 - i] * direct_causal_conv_reference(v, taps[i], bias[i])
        return torch.einsum("bte,de->btd", v, self.o_proj.weight)

    def init_cache(self, kv_policy=None):
        inputs = {f"inputs_{i + 1}": TokenBuffer(FullPolicy(), n_entries=1) for i in range(self.order)}
        return CompositeCache(conv=self.short_conv.init_cache(), **inputs)

    def state_bytes(self, context_len: int, batch_size: int = 1, bytes_per_elem: int = 2) -> int:
        inputs = self.order * batch_size * context_len * self.dims.d_model * bytes_per_elem
        return inputs + self.short_conv.state_bytes(context_len, batch_size, bytes_per_elem)

    def flops_breakdown(self, context_len: int, causal: bool = True) -> Flops:
        d, n, c = self.dims.d_model, self.order, max(context_len, 1)
        # the filter MLP runs once per forward over the c positions it needs: its per-position cost
        filt = self.filter.flops_per_position()
        # per channel and order: rfft of the inputs, of the filter, irfft of the product
        # (3 x 2.5 m log2 m at the zero-padded size m) and the spectral product (6 per frequency),
        # spread over the c tokens; then the skip term (a multiply-add; the gate is not counted)
        m = fft_size(2 * c)
        fft = 3 * _RFFT_FLOPS_PER_N_LOG2N * m * math.log2(m) + 6 * (m // 2 + 1)
        conv = Flops(other=n * d * (fft / c + 2.0))
        return Flops(linear=linear_flops(self.in_proj, self.o_proj)) + self.short_conv.flops_breakdown() + filt + conv

    def max_context(self, kv_policy=None) -> int | None:
        return self.dims.max_seq_len
