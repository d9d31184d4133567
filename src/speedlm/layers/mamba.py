"""Mamba (Gu & Dao 2023, arXiv:2312.00752): a selective state-space mixer.

    x, z  = W_in h                                   (two streams of d_inner = expand * d)
    x     = silu(causal_conv(x))                     (depthwise, kernel 4, with bias)
    dt_r, B, C = W_x x                               (dt_rank, N, N per token)
    dt_r, B, C = RMSNorm(dt_r), RMSNorm(B), RMSNorm(C)   (inner_norms: Jamba, arXiv:2403.19887 sec. 6)
    delta = softplus(W_dt dt_r + dt_bias)            (per channel)
    y     = selective_scan(x, delta, A = -exp(A_log), B, C) + D * x     (ops/selective_scan.py)
    out   = W_out( y * silu(z) )

Initialisation as the paper's code: A = -[1, ..., N] for every channel (S4D-real), stored as
A_log; D = 1; W_dt ~ U(-dt_rank^-0.5, dt_rank^-0.5); dt_bias = softplus^-1(dt) with
dt ~ logU[1e-3, 1e-1] floored at 1e-4, so that initial steps span three decades; the other
projections are N(0, init_std) like every mixer here. A layer's cache is a CompositeCache of the
convolution's last 3 inputs and the (B, d_inner, N) float32 SSM state; decoding is O(1) in the
context. Mamba blocks carry no FFN (the preset uses ffn "none" and twice the layers).

The inner norms run over each vector's own width (dt_rank, N, N), with learned gains as Jamba's;
`inner_norm_gains=False` drops the gains (FalconMamba's weightless norms) and `inner_norm_eps`
sets their epsilon apart from the model's `norm_eps` (FalconMamba's `mixer_rms_eps`).
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from speedlm.cache.composite import CompositeCache
from speedlm.cache.recurrent import RecurrentState
from speedlm.errors import SpeedlmError
from speedlm.layers.dims import ModelDims
from speedlm.layers.flops import Flops
from speedlm.layers.init import init_dt_bias
from speedlm.layers.mixer import Mixer, SeqMeta, linear_flops
from speedlm.layers.norm import RMSNorm
from speedlm.layers.short_conv import ShortConv
from speedlm.ops.selective_scan import SELECTIVE_SCAN, selective_scan_recurrent
from speedlm.registry import Range

class Mamba(Mixer):
    residual_out = ("out_proj",)

    def __init__(
        self,
        dims: ModelDims,
        d_state: Annotated[int, Range(min=1)] = 16,
        expand: Annotated[int, Range(min=1)] = 2,
        conv_kernel: Annotated[int, Range(min=1)] = 4,
        dt_rank: Annotated[int | None, Range(min=1)] = None,
        chunk_size: Annotated[int, Range(min=1)] = 32,
        inner_norms: bool = False,
        inner_norm_gains: bool = True,
        inner_norm_eps: Annotated[float | None, Range(min=0)] = None,
    ):
        super().__init__(dims)
        d = dims.d_model
        self.inner, self.d_state, self.chunk_size = expand * d, d_state, chunk_size
        self.dt_rank = math.ceil(d / 16) if dt_rank is None else dt_rank
        # Jamba (Lieber et al. 2024, section 6) RMS-normalises dt, B and C: it stabilised training at scale
        self.inner_norms, self.inner_norm_gains = inner_norms, inner_norm_gains
        self.inner_norm_eps = dims.norm_eps if inner_norm_eps is None else inner_norm_eps
        if inner_norms and inner_norm_gains:
            norms = (RMSNorm(n, self.inner_norm_eps) for n in (self.dt_rank, d_state, d_state))
            self.dt_norm, self.b_norm, self.c_norm = norms
        self.in_proj = nn.Linear(d, 2 * self.inner, bias=False)
        self.conv = ShortConv(self.inner, conv_kernel, bias=True)
        self.x_proj = nn.Linear(self.inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.inner, d_state))
        self.D = nn.Parameter(torch.empty(self.inner))
        self.out_proj = nn.Linear(self.inner, d, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()  # N(0, init_std) projections, zero biases
        self.conv.reset_parameters()
        for norm in self._inner_norms():
            norm.reset_parameters()
        bound = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        init_dt_bias(self.dt_proj.bias)
        with torch.no_grad():
            self.A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float64)).expand_as(self.A_log))
            self.D.fill_(1.0)

    @classmethod
    def check_options(cls, dims: ModelDims, inner_norms: bool = False, inner_norm_gains: bool = True,
                      inner_norm_eps: float | None = None, **options) -> None:
        if not inner_norms and (not inner_norm_gains or inner_norm_eps is not None):
            raise SpeedlmError("inner_norm_gains and inner_norm_eps shape the inner norms: they need inner_norms=True")

    # ----- the scan's inputs -----
    def _inner_norms(self) -> tuple[RMSNorm, ...]:
        return (self.dt_norm, self.b_norm, self.c_norm) if self.inner_norms and self.inner_norm_gains else ()

    def _normed(self, dt_r, B, C):
        """dt_r, B and C through the inner norms, each over its own last axis (with or without gains)."""
        if not self.inner_norms:
            return dt_r, B, C
        if self.inner_norm_gains:
            return self.dt_norm(dt_r), self.b_norm(B), self.c_norm(C)
        return tuple(F.rms_norm(v, (v.shape[-1],), None, self.inner_norm_eps) for v in (dt_r, B, C))

    def _scan_inputs(self, x_conv):
        dt_r, B, C = self.x_proj(x_conv).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt_r, B, C = self._normed(dt_r, B, C)
        delta = F.softplus(self.dt_proj(dt_r))
        return delta, B, C

    def mix(self, x, meta: SeqMeta, cache: CompositeCache | None = None):
        xs, z = self.in_proj(x).chunk(2, dim=-1)
        xs = F.silu(self.conv(xs, None if cache is None else cache["conv"]))
        delta, B, C = self._scan_inputs(xs)
        dt = RecurrentState.dtype_for(x.dtype)
        state = None if cache is None else cache["state"]
        init = None if state is None or state.state is None else state.state[0]
        y, final = SELECTIVE_SCAN(xs.to(dt), delta.to(dt), -torch.exp(self.A_log.to(dt)), B.to(dt), C.to(dt),
                                  initial_state=init, chunk_size=self.chunk_size)
        if state is not None:
            state.state = (final,)
        y = y.to(x.dtype) + self.D * xs
        return self.out_proj(y * F.silu(z))

    def reference(self, x, meta: SeqMeta):
        xz = torch.einsum("btd,ed->bte", x, self.in_proj.weight)
        xs, z = xz[..., : self.inner], xz[..., self.inner :]
        xs = self.conv.reference(xs)
        xs = xs * torch.sigmoid(xs)
        dbc = torch.einsum("bte,fe->btf", xs, self.x_proj.weight)
        dt_r, B, C = dbc[..., : self.dt_rank], dbc[..., self.dt_rank : -self.d_state], dbc[..., -self.d_state :]
        if self.inner_norms:
            eps = self.inner_norm_eps
            gains = [norm.weight for norm in self._inner_norms()] or [1.0, 1.0, 1.0]
            dt_r, B, C = (v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + eps) * gain
                          for gain, v in zip(gains, (dt_r, B, C)))
        delta = torch.log1p(torch.exp(torch.einsum("btr,er->bte", dt_r, self.dt_proj.weight) + self.dt_proj.bias))
        y, _ = selective_scan_recurrent(xs, delta, -torch.exp(self.A_log), B, C)
        y = (y + self.D * xs) * z * torch.sigmoid(z)
        return torch.einsum("bte,de->btd", y, self.out_proj.weight)

    # ----- cache and costs -----
    def init_cache(self, kv_policy=None):
        return CompositeCache(conv=self.conv.init_cache(), state=RecurrentState())

    def state_bytes(self, context_len: int, batch_size: int = 1, bytes_per_elem: int = 2) -> int:
        ssm = batch_size * self.inner * self.d_state * RecurrentState.bytes_per_elem(bytes_per_elem)
        return self.conv.state_bytes(context_len, batch_size, bytes_per_elem) + ssm

    def flops_breakdown(self, context_len: int, causal: bool = True) -> Flops:
        # the chunked scan as run: per channel and state element, the decay (2), the input (1) and
        # the update (2) in each of its two passes (elementwise), and the read-out h C (a bmm)
        scan = Flops(matmul=2.0 * self.inner * self.d_state, other=10.0 * self.inner * self.d_state)
        linear = linear_flops(self.in_proj, self.x_proj, self.dt_proj, self.out_proj)
        return Flops(linear=linear) + self.conv.flops_breakdown() + scan
