"""RWKV-7 "Goose" time mixing (Peng et al. 2025, arXiv:2503.14456): the generalised delta rule
with a vector-valued decay and a vector-valued in-context learning rate, over token-shifted inputs.

    x*_t   = x_t + (x_{t-1} - x_t) mu_*                     token shift, one mu per branch
    r, k, v = W_r x^r, W_k x^k, W_v x^v
    w      = -exp(-1/2) sigmoid(w0 + tanh(x^w A_w) B_w)     log decay per channel, in (-0.61, 0)
    a      = sigmoid(a0 + x^a A_a B_a)                      in-context learning rate per channel
    g      = sigmoid(x^g A_g) B_g                           output gate
    kappa  = L2norm_heads(k * k_k);   k <- k * (1 + (a - 1) k_a)
    S_t    = diag(exp(w_t)) S_{t-1} - (kappa_t a_t)(kappa_t^T S_{t-1}) + k_t v_t^T   (ops/dplr.py)
    o_t    = S_t^T r_t,  y = W_o( (GroupNorm_heads(o) + (r . (k * r_k))_head v) * g )

As the paper's code (flash-linear-attention's RWKV7Attention, with its low-rank sizes and its
initialisation: the token-shift mixes, decay and learning-rate biases by channel and depth,
k_k, k_a, r_k, orthogonal r/k/v projections, zero LoRA down-projections). Simplified: heads of
the model's head width (RWKV-7: 64 channels), no value residual from the first layer (v_first:
a channel between layers that the mixer contract does not have), the output projection starts
at the library's scaled normal init (RWKV: zeros), and the channel-mixing FFN is the model's FFN.
The cache holds the state S and the last input (the token shift).
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from speedlm.cache.recurrent import RecurrentState
from speedlm.layers.dims import ModelDims
from speedlm.layers.flops import Flops, chunk_visible_keys
from speedlm.layers.mixer import Mixer, SeqMeta, linear_flops
from speedlm.ops.dplr import dplr_chunked, dplr_recurrent
from speedlm.registry import Range

DECAY_SCALE = math.exp(-0.5)  # |w| <= exp(-1/2): the bound the chunked form relies on (ops/dplr.py)
BRANCHES = ("r", "w", "k", "v", "a", "g")


def _low_rank(d: int, multiplier: float, head_factor: float) -> int:
    """RWKV-7's LoRA widths: multiplier * sqrt(d) (scaled by head_dim / 64), in multiples of 32."""
    return max(32, int(round(multiplier * math.sqrt(d) * head_factor / 32) * 32))


class RWKV7(Mixer):
    def __init__(
        self,
        dims: ModelDims,
        decay_rank: Annotated[int | None, Range(min=1)] = None,
        a_rank: Annotated[int | None, Range(min=1)] = None,
        gate_rank: Annotated[int | None, Range(min=1)] = None,
        chunk_size: Annotated[int, Range(min=1)] = 32,
    ):
        super().__init__(dims)
        d, self.n_heads, self.head_dim = dims.d_model, dims.n_heads, dims.head_dim
        self.chunk_size = chunk_size
        factor = self.head_dim / 64
        ranks = {"w": decay_rank or _low_rank(d, 2.5, factor), "a": a_rank or _low_rank(d, 2.5, factor),
                 "g": gate_rank or _low_rank(d, 5.0, 1.0)}
        self.mu = nn.ParameterDict({name: nn.Parameter(torch.zeros(d)) for name in BRANCHES})
        self.r_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.w_down, self.w_up = nn.Linear(d, ranks["w"], bias=False), nn.Linear(ranks["w"], d)
        self.a_down, self.a_up = nn.Linear(d, ranks["a"], bias=False), nn.Linear(ranks["a"], d)
        self.g_down, self.g_up = nn.Linear(d, ranks["g"], bias=False), nn.Linear(ranks["g"], d, bias=False)
        self.k_k, self.k_a = nn.Parameter(torch.zeros(d)), nn.Parameter(torch.zeros(d))
        self.r_k = nn.Parameter(torch.zeros(self.n_heads, self.head_dim))
        self.norm_weight, self.norm_bias = nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d))
        self.norm_eps = self.head_dim * 1e-5  # RWKV-7's GroupNorm epsilon
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        super().reset_parameters()  # N(0, init_std) for every Linear (o_proj keeps it), zero biases
        d, layer, n_layers = self.dims.d_model, self.dims.layer_idx, self.dims.n_layers
        ratio_0_to_1 = layer / max(1, n_layers - 1)
        ratio_1_to_0 = 1.0 - layer / n_layers
        n = torch.arange(d, dtype=torch.float64)
        ddd = n / d
        linear = n / max(1, d - 1) - 0.5
        zig = ((n % self.head_dim) - (self.head_dim - 1) / 2) / max((self.head_dim - 1) / 2, 1e-9)
        zigzag = zig * zig.abs()
        www = -6 + 6 * (n / max(1, d - 1)) ** (1 + ratio_0_to_1**0.3)
        for name, power in zip(BRANCHES, (0.2, 0.9, 0.7, 0.7, 0.9, 0.2)):
            self.mu[name].copy_(1.0 - ddd ** (power * ratio_1_to_0))
        self.k_a.fill_(1.02)
        self.r_k.fill_(-0.04)
        self.k_k.copy_(0.71 - linear * 0.1)
        for down, up in ((self.w_down, self.w_up), (self.a_down, self.a_up), (self.g_down, self.g_up)):
            nn.init.zeros_(down.weight)
            rows, cols = up.weight.shape
            nn.init.orthogonal_(up.weight, gain=0.1 * (math.sqrt(cols / rows) if cols > rows else 1.0))
        self.w_up.bias.copy_(www + 0.5 + zigzag * 2.5)
        self.a_up.bias.copy_(-0.19 + zigzag * 0.3 + linear * 0.4)
        self.norm_weight.fill_(((layer + 1) / n_layers) ** 0.7)
        self.norm_bias.zero_()
        nn.init.orthogonal_(self.r_proj.weight)
        nn.init.orthogonal_(self.k_proj.weight, gain=0.1)
        nn.init.orthogonal_(self.v_proj.weight)

    def _heads(self, y: torch.Tensor) -> torch.Tensor:
        b, t, _ = y.shape
        return y.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)

    def _branches(self, x, prev):
        """The token-shifted inputs of the six branches; prev (B, D) the token before x[:, 0]."""
        shifted = torch.cat([prev[:, None], x[:, :-1]], dim=1)
        delta = shifted - x
        return {name: torch.addcmul(x, delta, self.mu[name]) for name in BRANCHES}

    def mix(self, x, meta: SeqMeta, cache: RecurrentState | None = None):
        state = None if cache is None or cache.state is None else cache.state
        prev = x.new_zeros(x.shape[0], x.shape[2]) if state is None else state[1].to(x.dtype)
        xs = self._branches(x, prev)
        r, k, v = self.r_proj(xs["r"]), self.k_proj(xs["k"]), self.v_proj(xs["v"])
        w = -DECAY_SCALE * torch.sigmoid(self.w_up(torch.tanh(self.w_down(xs["w"]))))
        a = torch.sigmoid(self.a_up(self.a_down(xs["a"])))
        g = self.g_up(torch.sigmoid(self.g_down(xs["g"])))
        kappa = F.normalize(self._heads(k * self.k_k), dim=-1)
        k = k.addcmul(k * (a - 1), self.k_a)
        dt = RecurrentState.dtype_for(x.dtype)
        rh, kh, vh, ah, wh = (self._heads(y).to(dt) for y in (r, k, v, a, w))
        kappa = kappa.to(dt)
        o, s = dplr_chunked(rh, kh, vh, -kappa, kappa * ah, wh, None if state is None else state[0], self.chunk_size)
        if cache is not None:
            cache.state = (s, x[:, -1].to(dt))  # recurrent state is float32 or better, the shift's too
        o = F.group_norm(o.transpose(1, 2).reshape(-1, self.dims.d_model).to(x.dtype), self.n_heads,
                         self.norm_weight, self.norm_bias, self.norm_eps).view_as(x)
        bonus = ((self._heads(r) * self._heads(k) * self.r_k[:, None]).sum(-1, keepdim=True) * self._heads(v))
        return self.o_proj((o + bonus.transpose(1, 2).reshape_as(x)) * g)

    def reference(self, x, meta: SeqMeta):
        """The same layer from the weights with einsums and explicit formulas, through the
        token-by-token recurrence."""
        def lin(y, layer):
            out = torch.einsum("btd,ed->bte", y, layer.weight)
            return out if layer.bias is None else out + layer.bias

        shifted = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
        xs = {name: x + (shifted - x) * self.mu[name] for name in BRANCHES}
        r, k, v = lin(xs["r"], self.r_proj), lin(xs["k"], self.k_proj), lin(xs["v"], self.v_proj)
        w = -DECAY_SCALE / (1 + torch.exp(-lin(torch.tanh(lin(xs["w"], self.w_down)), self.w_up)))
        a = 1 / (1 + torch.exp(-lin(lin(xs["a"], self.a_down), self.a_up)))
        g = lin(1 / (1 + torch.exp(-lin(xs["g"], self.g_down))), self.g_up)
        kk = self._heads(k * self.k_k)
        kappa = kk / kk.pow(2).sum(-1, keepdim=True).sqrt().clamp_min(1e-12)
        k = k * (1 + (a - 1) * self.k_a)
        rh, kh, vh, ah, wh = (self._heads(y) for y in (r, k, v, a, w))
        o, _ = dplr_recurrent(rh, kh, vh, -kappa, kappa * ah, wh)
        mean = o.mean(-1, keepdim=True)
        var = (o - mean).pow(2).mean(-1, keepdim=True)
        o = (o - mean) / torch.sqrt(var + self.norm_eps)
        o = o.transpose(1, 2).reshape_as(x) * self.norm_weight + self.norm_bias
        bonus = (rh * kh * self.r_k[:, None]).sum(-1, keepdim=True) * vh
        return lin((o + bonus.transpose(1, 2).reshape_as(x)) * g, self.o_proj)

    def init_cache(self, kv_policy=None):
        return RecurrentState()

    def state_bytes(self, context_len: int, batch_size: int = 1, bytes_per_elem: int = 2) -> int:
        # the matrix state and the last input (the token shift), both float32 or better
        elems = self.n_heads * self.head_dim * self.head_dim + self.dims.d_model
        return batch_size * elems * RecurrentState.bytes_per_elem(bytes_per_elem)

    def flops_breakdown(self, context_len: int, causal: bool = True) -> Flops:
        # the chunked form (ops/dplr.py) per token and head: five C x C products at Dk (A_ab, A_ak,
        # A_qk, A_qb and A_qb X) and three at Dv (A_ak V, A_qk V, A_qb Y) over their causal halves;
        # per chunk B^T X (Dk x Dk), K^T V and B^T Y (Dk x Dv), the transition times the state;
        # the state read per token (the triangular solve is not a product the counter sees)
        keys, c = chunk_visible_keys(context_len, self.chunk_size), min(self.chunk_size, context_len)
        dk = dv = self.head_dim
        per_head = 2 * keys * (5 * dk + 3 * dv) + 2 * dk * dk + 6 * dk * dv + 2 * dk * dk * dv / c
        low_rank = linear_flops(self.w_down, self.w_up, self.a_down, self.a_up, self.g_down, self.g_up)
        return Flops(linear=linear_flops(self.r_proj, self.k_proj, self.v_proj, self.o_proj) + low_rank,
                     matmul=self.n_heads * per_head)
