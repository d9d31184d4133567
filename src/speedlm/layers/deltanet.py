"""DeltaNet (Yang et al. 2024, arXiv:2406.06484) and Gated DeltaNet (Yang et al. 2024,
arXiv:2412.06464): linear attention with the delta rule (ops/delta_rule.py).

    q, k, v = silu(short_conv(W_q x)), silu(short_conv(W_k x)), silu(short_conv(W_v x))
    q, k    = q / |q|, k / |k|                         (L2 per head)
    beta_t  = sigmoid(W_beta x_t)                       (per head: how much of v_t is written)
    a_t     = exp(-exp(A_log) * softplus(W_a x_t + dt_bias))     (Gated DeltaNet only)
    S_t     = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = S_t^T q_t / sqrt(Dk)
    y       = W_o( RMSNorm_heads(o) [* swish(W_g x)] )

The short causal convolution (kernel 4) carries its own decode state, so a layer's cache is a
CompositeCache of the conv inputs and the matrix state. Gated DeltaNet's decay follows Mamba-2:
A ~ U[1, 16] stored as A_log, dt_bias the inverse softplus of dt ~ logU[1e-3, 1e-1]; it adds an
output gate and, as in its paper, values twice as wide as keys.

Shapes beyond the paper's (the FLA layer's and Qwen3-Next's): `heads` value heads (each with its
own state, beta, decay and output gate; default the model's n_heads) may read `key_heads` < heads
query/key heads, value head j using key head j // (heads / key_heads) (grouped values, like GQA
read the other way round); `key_dim` / `value_dim` set the widths per head. `qk_norm_eps` is what
the L2 norm adds to |q|^2 and |k|^2: speedlm's default 1e-12, FLA's and Qwen3-Next's l2norm 1e-6.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from speedlm.cache.composite import CompositeCache
from speedlm.cache.recurrent import RecurrentState
from speedlm.errors import SpeedlmError
from speedlm.layers.dims import ModelDims
from speedlm.layers.flops import Flops, attention_flops, chunk_visible_keys
from speedlm.layers.init import init_a_log, init_dt_bias
from speedlm.layers.mixer import SeqMeta, linear_flops
from speedlm.layers.recurrent_heads import GatedHeadsMixer
from speedlm.layers.short_conv import ShortConv
from speedlm.ops.conv import causal_conv1d_reference
from speedlm.ops.delta_rule import DELTA_RULE, delta_rule_recurrent
from speedlm.registry import Range


def l2_normalize(x: torch.Tensor, eps_sq: float = 1e-12) -> torch.Tensor:
    """x / sqrt(|x|^2 + eps_sq) over the last dim (head channels). Written out rather than
    F.normalize, whose norm kernel is several times slower on the strided head views it gets here."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps_sq)


class DeltaNet(GatedHeadsMixer):
    gated_decay = False

    @classmethod
    def check_options(cls, dims: ModelDims, heads: int | None = None, key_heads: int | None = None, **options) -> None:
        h = dims.n_heads if heads is None else heads
        if key_heads is not None and h % key_heads:
            raise SpeedlmError(f"key_heads={key_heads} must be a positive divisor of the value heads ({h})")

    def __init__(
        self,
        dims: ModelDims,
        conv_kernel: Annotated[int, Range(min=1)] = 4,
        chunk_size: Annotated[int, Range(min=1)] = 64,
        gate: bool = False,
        value_factor: Annotated[int, Range(min=1)] = 1,
        heads: Annotated[int | None, Range(min=1)] = None,
        key_heads: Annotated[int | None, Range(min=1)] = None,
        key_dim: Annotated[int | None, Range(min=1)] = None,
        value_dim: Annotated[int | None, Range(min=1)] = None,
        qk_norm_eps: Annotated[float, Range(min=0)] = 1e-12,
    ):
        """heads: value heads (default the model's n_heads); key_heads: query/key heads, a divisor
        of heads (default heads); key_dim: query/key width per head (default the model's head_dim);
        value_dim: value width per head (default value_factor * key_dim)."""
        key_dim = dims.head_dim if key_dim is None else key_dim
        value_dim = value_factor * key_dim if value_dim is None else value_dim
        if heads is not None:
            dims = replace(dims, n_heads=heads)
        super().__init__(dims, key_dim=key_dim, value_dim=value_dim, norm="rms", gate=gate, chunk_size=chunk_size)
        h, d = self.n_heads, dims.d_model
        self.key_heads = h if key_heads is None else key_heads
        self.qk_norm_eps = qk_norm_eps
        if self.key_heads != h:  # grouped values: fewer query/key heads than HeadsMixer's n_heads
            self.q_proj = nn.Linear(d, self.key_heads * key_dim, bias=False)
            self.k_proj = nn.Linear(d, self.key_heads * key_dim, bias=False)
        self.conv = ShortConv(2 * self.key_heads * key_dim + h * value_dim, conv_kernel, bias=False)
        self.beta_proj = nn.Linear(d, h, bias=False)
        if self.gated_decay:
            self.a_proj = nn.Linear(d, h, bias=False)
            self.A_log = nn.Parameter(torch.empty(h))
            self.dt_bias = nn.Parameter(torch.empty(h))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()  # N(0, init_std) projections
        self.conv.reset_parameters()
        if self.gated_decay:
            init_a_log(self.A_log)
            init_dt_bias(self.dt_bias)

    # ----- inputs of the recurrence -----
    def _qkv(self, x, conv_out):
        h, hk, dk, dv = self.n_heads, self.key_heads, self.key_dim, self.value_dim
        q, k, v = F.silu(conv_out).split([hk * dk, hk * dk, h * dv], dim=-1)
        q, k, v = self.split_heads(q, hk), self.split_heads(k, hk), self.split_heads(v, h)
        q, k = l2_normalize(q, self.qk_norm_eps), l2_normalize(k, self.qk_norm_eps)
        if hk != h:  # each key head serves heads / key_heads consecutive value heads
            q, k = q.repeat_interleave(h // hk, dim=1), k.repeat_interleave(h // hk, dim=1)
        return q, k, v

    def _beta_and_decay(self, x):
        beta = torch.sigmoid(self.beta_proj(x)).transpose(1, 2)  # (B, H, T)
        if not self.gated_decay:
            return beta, None
        g = -torch.exp(self.A_log) * F.softplus(self.a_proj(x) + self.dt_bias)
        return beta, g.transpose(1, 2)

    def mix(self, x, meta: SeqMeta, cache: CompositeCache | None = None):
        projected = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        q, k, v = self._qkv(x, self.conv(projected, None if cache is None else cache["conv"]))
        beta, g = self._beta_and_decay(x)
        dt = self.recurrence_dtype(x)
        state = None if cache is None else cache["state"]
        init = None if state is None or state.state is None else state.state[0]
        o, final = DELTA_RULE(q.to(dt), k.to(dt), v.to(dt), beta.to(dt), None if g is None else g.to(dt),
                                      initial_state=init, chunk_size=self.chunk_size)
        if state is not None:
            state.state = (final,)
        return self.gated_output(o, x)

    def reference(self, x, meta: SeqMeta):
        """The paper's layer (the module doc) without the fast path's `_qkv`: each of
        q, k, v is its own projection, its own depthwise causal conv (the conv's channels are q | k
        | v, naive op) and silu, split into heads of consecutive channels; q and k divided by
        sqrt(|q|^2 + qk_norm_eps) per head; value head j reads key head j // (heads / key_heads);
        beta = sigmoid(W_beta x)."""
        b, t, _ = x.shape
        h, hk, dk, dv = self.n_heads, self.key_heads, self.key_dim, self.value_dim
        conv_lo = {"q": 0, "k": hk * dk, "v": 2 * hk * dk}
        heads = {}
        for name, proj, n, width in (("q", self.q_proj, hk, dk), ("k", self.k_proj, hk, dk), ("v", self.v_proj, h, dv)):
            lo, hi = conv_lo[name], conv_lo[name] + n * width
            u = causal_conv1d_reference(torch.einsum("btd,ed->bte", x, proj.weight), self.conv.weight[lo:hi])
            u = u * torch.sigmoid(u)  # silu
            heads[name] = u.reshape(b, t, n, width).permute(0, 2, 1, 3)  # (B, n, T, width)
        key_of = torch.arange(h) * hk // h  # the key head of each value head
        q, k, v = heads["q"][:, key_of], heads["k"][:, key_of], heads["v"]
        q = q / torch.sqrt(q.pow(2).sum(-1, keepdim=True) + self.qk_norm_eps)
        k = k / torch.sqrt(k.pow(2).sum(-1, keepdim=True) + self.qk_norm_eps)
        beta = torch.sigmoid(torch.einsum("btd,hd->bht", x, self.beta_proj.weight))
        g = None
        if self.gated_decay:
            z = torch.einsum("btd,hd->bht", x, self.a_proj.weight) + self.dt_bias[:, None]
            g = -torch.exp(self.A_log)[:, None] * torch.log1p(torch.exp(z))
        o, _ = delta_rule_recurrent(q, k, v, beta, g)
        return self.reference_gated_output(o, x)

    # ----- cache and costs -----
    def init_cache(self, kv_policy=None):
        return CompositeCache(conv=self.conv.init_cache(), state=RecurrentState())

    def state_bytes(self, context_len: int, batch_size: int = 1, bytes_per_elem: int = 2) -> int:
        return self.conv.state_bytes(context_len, batch_size, bytes_per_elem) + super().state_bytes(
            context_len, batch_size, bytes_per_elem
        )

    def flops_breakdown(self, context_len: int, causal: bool = True) -> Flops:
        """The chunked delta rule (ops/delta_rule.py), each C x C product at its visible pairs."""
        n, dk, dv = context_len, self.key_dim, self.value_dim
        c = max(1, min(self.chunk_size, n))
        keys = chunk_visible_keys(n, c)  # a query and the keys up to it in its chunk; K K^T: the earlier ones
        per_head = (
            2 * dk * (keys - 1)  # K K^T, its strict lower triangle (all the solve reads)
            + attention_flops(1, keys, dk, dk + dv)  # Q K^T, then A W and A U (the outputs' in-chunk part)
            + 2 * dk * dk + 2 * dk * dv  # the chunk's transition K^T W and injection K^T U
            + 2 * dk * dv  # each output's read of the state entering its chunk
            + 2 * dk * dk * dv * -(-n // c) / max(n, 1)  # the state across each chunk, M S
        )
        solve = 2 * (keys - 1) * (dk + dv)  # forward substitution over the earlier rows: no matmul the counter sees
        linear = self.projection_flops() + linear_flops(self.beta_proj) + (linear_flops(self.a_proj) if self.gated_decay else 0.0)
        own = Flops(linear=linear, matmul=self.n_heads * per_head, other=self.n_heads * solve)
        return own + self.conv.flops_breakdown()


class GatedDeltaNet(DeltaNet):
    gated_decay = True

    def __init__(
        self,
        dims: ModelDims,
        conv_kernel: Annotated[int, Range(min=1)] = 4,
        chunk_size: Annotated[int, Range(min=1)] = 64,
        gate: bool = True,
        value_factor: Annotated[int, Range(min=1)] = 2,
        heads: Annotated[int | None, Range(min=1)] = None,
        key_heads: Annotated[int | None, Range(min=1)] = None,
        key_dim: Annotated[int | None, Range(min=1)] = None,
        value_dim: Annotated[int | None, Range(min=1)] = None,
        qk_norm_eps: Annotated[float, Range(min=0)] = 1e-12,
    ):
        super().__init__(dims, conv_kernel, chunk_size, gate, value_factor, heads, key_heads, key_dim, value_dim,
                         qk_norm_eps)
