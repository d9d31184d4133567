"""Mamba-2 (Dao & Gu 2024, arXiv:2405.21060): the SSD mixer.

    z, xBC, dt = W_in h                      (d_inner, d_inner + 2 G N, H)
    x, B, C    = silu(causal_conv(xBC))      (depthwise, kernel 4, with bias; B, C: G groups of N)
    dt         = softplus(dt + dt_bias)      (one step per head)
    y          = SSD(x, dt, A = -exp(A_log), B, C) + D * x       (ops/ssd.py; heads of P channels)
    out        = W_out( RMSNorm_groups(y * silu(z)) )            (gated RMSNorm, norm after gate)

One scalar decay per head is what makes the chunked SSD matrix products. Initialisation as the
paper's code: A ~ U[1, 16] stored as A_log; dt_bias = softplus^-1(dt), dt ~ logU[1e-3, 1e-1];
D = 1; the gated norm normalises each group's d_inner / G channels (mamba-ssm's RMSNormGated
with group_size = d_inner / ngroups). Cache: the conv's last 3 inputs and the (B, H, P, N)
float32 state, O(1) in the context. Like Mamba, the block carries no FFN.

Options for the Mamba-2 variants that checkpoints use (Falcon-H1's mixer, e.g.): `d_inner` sets the
inner width directly where it is no multiple of d_model; `norm` places the gated RMSNorm after the
gate (the paper's), before it (`RMSNorm_groups(y) * silu(z)`, mamba-ssm's norm_before_gate), or
drops it (`y * silu(z)`, no norm weight); `conv_bias=False` drops the conv's bias.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import nn

from speedlm.cache.composite import CompositeCache
from speedlm.cache.recurrent import RecurrentState
from speedlm.errors import SpeedlmError
from speedlm.layers.dims import ModelDims
from speedlm.layers.flops import Flops, chunk_visible_keys
from speedlm.layers.init import init_a_log, init_dt_bias
from speedlm.layers.mixer import Mixer, SeqMeta, linear_flops
from speedlm.layers.short_conv import ShortConv
from speedlm.ops.conv import causal_conv1d_reference
from speedlm.ops.ssd import SSD, ssd_recurrent
from speedlm.registry import Range

# where the gated RMSNorm sits: after the gate (the paper's), before it, or not at all
GatedNorm = Literal["after_gate", "before_gate", "none"]


class Mamba2(Mixer):
    residual_out = ("out_proj",)

    @classmethod
    def check_options(cls, dims: ModelDims, expand: int = 2, head_dim: int = 64, n_groups: int = 1,
                      d_inner: int | None = None, **options) -> None:
        inner = expand * dims.d_model if d_inner is None else d_inner
        if inner % head_dim:
            raise SpeedlmError(f"mamba2: head_dim={head_dim} must divide d_inner = {inner}")
        if (inner // head_dim) % n_groups:
            raise SpeedlmError(f"mamba2: n_groups={n_groups} must divide the number of heads {inner // head_dim}")

    def __init__(
        self,
        dims: ModelDims,
        d_state: Annotated[int, Range(min=1)] = 64,
        expand: Annotated[int, Range(min=1)] = 2,
        head_dim: Annotated[int, Range(min=1)] = 64,
        n_groups: Annotated[int, Range(min=1)] = 1,
        conv_kernel: Annotated[int, Range(min=1)] = 4,
        chunk_size: Annotated[int, Range(min=1)] = 64,
        d_inner: Annotated[int | None, Range(min=1)] = None,  # default: expand * d_model
        norm: GatedNorm = "after_gate",
        conv_bias: bool = True,
    ):
        super().__init__(dims)
        self.check_options(dims, expand=expand, head_dim=head_dim, n_groups=n_groups, d_inner=d_inner)
        d = dims.d_model
        self.inner = expand * d if d_inner is None else d_inner
        self.d_state, self.head_dim, self.n_groups, self.norm_position = d_state, head_dim, n_groups, norm
        self.n_heads, self.chunk_size = self.inner // head_dim, chunk_size
        self.conv_dim = self.inner + 2 * n_groups * d_state
        self.in_proj = nn.Linear(d, self.inner + self.conv_dim + self.n_heads, bias=False)
        self.conv = ShortConv(self.conv_dim, conv_kernel, bias=conv_bias)
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.D = nn.Parameter(torch.empty(self.n_heads))
        self.norm_weight = None if norm == "none" else nn.Parameter(torch.empty(self.inner))
        self.out_proj = nn.Linear(self.inner, d, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self.conv.reset_parameters()
        init_dt_bias(self.dt_bias)
        init_a_log(self.A_log)
        with torch.no_grad():
            self.D.fill_(1.0)
            if self.norm_weight is not None:
                self.norm_weight.fill_(1.0)

    def _split(self, zxbcdt):
        return zxbcdt.split([self.inner, self.conv_dim, self.n_heads], dim=-1)

    def _ssd_inputs(self, xbc):
        b, t, _ = xbc.shape
        g, n = self.n_groups, self.d_state
        xs, B, C = xbc.split([self.inner, g * n, g * n], dim=-1)
        return xs.view(b, t, self.n_heads, self.head_dim), B.view(b, t, g, n), C.view(b, t, g, n)

    def _gated_norm(self, y, z, rms):
        if self.norm_position == "none":
            return y * F.silu(z)
        b, t, _ = y.shape
        if self.norm_position == "before_gate":
            return rms(y.view(b, t, self.n_groups, -1)).reshape(b, t, self.inner) * self.norm_weight * F.silu(z)
        g = (y * F.silu(z)).view(b, t, self.n_groups, -1)
        return rms(g).reshape(b, t, self.inner) * self.norm_weight

    def mix(self, x, meta: SeqMeta, cache: CompositeCache | None = None):
        z, xbc, dt = self._split(self.in_proj(x))
        xbc = F.silu(self.conv(xbc, None if cache is None else cache["conv"]))
        xs, B, C = self._ssd_inputs(xbc)
        dt = F.softplus(dt + self.dt_bias)
        rd = RecurrentState.dtype_for(x.dtype)
        state = None if cache is None else cache["state"]
        init = None if state is None or state.state is None else state.state[0]
        y, final = SSD(xs.to(rd), dt.to(rd), -torch.exp(self.A_log.to(rd)), B.to(rd), C.to(rd),
                       initial_state=init, chunk_size=self.chunk_size)
        if state is not None:
            state.state = (final,)
        y = (y.to(x.dtype) + self.D[:, None] * xs).flatten(2)
        eps = self.dims.norm_eps
        return self.out_proj(self._gated_norm(y, z, lambda v: F.rms_norm(v, (v.shape[-1],), eps=eps)))

    def reference(self, x, meta: SeqMeta):
        """The paper's block (its block design section, as the module doc) written out, none of the fast
        path's helpers shared: in_proj rows in the order z | x | B | C | dt, the depthwise causal conv
        (naive op) and silu on x, B, C; dt = softplus(dt + dt_bias), A = -exp(A_log); the naive
        SSD recurrence plus D x; then, per group of d_inner / G channels, RMSNorm(y * silu(z)) (or
        RMSNorm(y) * silu(z), or no norm, as `norm` says)."""
        b, t, _ = x.shape
        e, g, n, h, p = self.inner, self.n_groups, self.d_state, self.n_heads, self.head_dim
        w = self.in_proj.weight
        rows = {"z": (0, e), "x": (e, 2 * e), "B": (2 * e, 2 * e + g * n), "C": (2 * e + g * n, 2 * e + 2 * g * n),
                "dt": (2 * e + 2 * g * n, 2 * e + 2 * g * n + h)}
        proj = {name: torch.einsum("btd,ed->bte", x, w[lo:hi]) for name, (lo, hi) in rows.items()}
        conv_w, conv_b = self.conv.weight, self.conv.bias  # channels in the order x | B | C
        conv_rows = {"x": (0, e), "B": (e, e + g * n), "C": (e + g * n, e + 2 * g * n)}
        act = {}
        for name, (lo, hi) in conv_rows.items():
            u = causal_conv1d_reference(proj[name], conv_w[lo:hi], None if conv_b is None else conv_b[lo:hi])
            act[name] = u * torch.sigmoid(u)  # silu
        xs = act["x"].reshape(b, t, h, p)
        B, C = act["B"].reshape(b, t, g, n), act["C"].reshape(b, t, g, n)
        dt = torch.log1p(torch.exp(proj["dt"] + self.dt_bias))  # softplus
        y, _ = ssd_recurrent(xs, dt, -torch.exp(self.A_log), B, C)
        y = (y + self.D[:, None] * xs).reshape(b, t, e)
        z = proj["z"]
        gate = z * torch.sigmoid(z)  # silu

        def group_rms(v):
            v = v.reshape(b, t, g, e // g)
            return (v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + self.dims.norm_eps)).reshape(b, t, e)

        if self.norm_position == "none":
            y = y * gate
        elif self.norm_position == "before_gate":
            y = group_rms(y) * self.norm_weight * gate
        else:
            y = group_rms(y * gate) * self.norm_weight
        return torch.einsum("bte,de->btd", y, self.out_proj.weight)

    # ----- cache and costs -----
    def init_cache(self, kv_policy=None):
        return CompositeCache(conv=self.conv.init_cache(), state=RecurrentState())

    def state_bytes(self, context_len: int, batch_size: int = 1, bytes_per_elem: int = 2) -> int:
        ssm = batch_size * self.n_heads * self.head_dim * self.d_state * RecurrentState.bytes_per_elem(bytes_per_elem)
        return self.conv.state_bytes(context_len, batch_size, bytes_per_elem) + ssm

    def flops_breakdown(self, context_len: int, causal: bool = True) -> Flops:
        # the chunked SSD, per token: C B^T over the causal half of each chunk (per group), its
        # mix of the head's inputs (per head), the chunk state (P x N per head), the state read (P x N)
        keys, n, p = chunk_visible_keys(context_len, self.chunk_size), self.d_state, self.head_dim
        ssd = self.n_groups * 2 * keys * n + self.n_heads * (2 * keys * p + 2 * p * n + 2 * p * n)
        return Flops(linear=linear_flops(self.in_proj, self.out_proj), matmul=ssd) + self.conv.flops_breakdown()
