"""TTT-Linear (Sun et al. 2024, Learning to (Learn at Test Time): RNNs with Expressive Hidden States,
arXiv:2407.04620): a layer whose hidden state is the weights of a linear model, trained on the
sequence by mini-batch gradient descent as it is read (ops/ttt.py).

Per head, with the outer model's projections theta_Q, theta_K, theta_V:

    inner model  f(x; W, c) = x + LN(x W + c)          (W: head_dim x head_dim, learned W_0, c_0, LN)
    inner loss   l_s = 1/2 || f(theta_K x_s) - theta_V x_s ||^2
    update       W  -= (1 / i_t) sum_s eta_s grad l_s(W at the mini-batch's start)   mini-batches of 16
    output       z_t = f(theta_Q x_t; W_t),   y = W_o LN(z)

with a learned inner learning rate per token and head, eta = base_lr sigmoid(w_lr . x + b_lr) /
head_dim (the paper's parameterisation, base_lr 1). Simplified: no RoPE on the inner model's
inputs, no causal convolution before them, no output gate (the paper's Mamba-backbone variant);
the output norm is one LayerNorm over the width. Mini-batch boundaries are absolute positions
(multiples of `mini_batch` from the sequence start), so chunked prefill and decoding give the
same function; the cache holds the mini-batch's starting weights and its gradient sums.
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from speedlm.cache.recurrent import RecurrentState
from speedlm.layers.dims import ModelDims
from speedlm.layers.flops import Flops, chunk_visible_keys
from speedlm.layers.heads import HeadsMixer
from speedlm.layers.mixer import SeqMeta, linear_flops
from speedlm.ops.ttt import empty_state, ttt_linear_minibatch, ttt_linear_recurrent
from speedlm.registry import Range


class TTTLinear(HeadsMixer):
    def __init__(
        self,
        dims: ModelDims,
        mini_batch: Annotated[int, Range(min=1)] = 16,
        base_lr: Annotated[float, Range(min=0.0)] = 1.0,
    ):
        super().__init__(dims)
        h, dh = self.n_heads, self.head_dim
        self.mini_batch, self.base_lr = mini_batch, base_lr
        self.lr_proj = nn.Linear(dims.d_model, h, bias=True)
        self.w0 = nn.Parameter(torch.zeros(h, dh, dh))
        self.c0 = nn.Parameter(torch.zeros(h, dh))
        self.inner_gain = nn.Parameter(torch.ones(h, dh))
        self.inner_bias = nn.Parameter(torch.zeros(h, dh))
        self.out_gain = nn.Parameter(torch.ones(dims.d_model))
        self.out_bias = nn.Parameter(torch.zeros(dims.d_model))
        self.inner_eps = 1e-6
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.normal_(self.w0, 0.0, 0.02)
        for p in (self.c0, self.inner_bias, self.out_bias):
            p.zero_()
        for p in (self.inner_gain, self.out_gain):
            p.fill_(1.0)

    def _eta(self, x, dt):
        return (self.base_lr * torch.sigmoid(self.lr_proj(x).to(dt)) / self.head_dim).transpose(1, 2)

    def mix(self, x, meta: SeqMeta, cache: RecurrentState | None = None):
        q, k, v = self.project(x)
        dt = RecurrentState.dtype_for(x.dtype)
        state = None if cache is None else cache.state
        if state is None:
            state = empty_state(self.w0.to(dt), self.c0.to(dt), x.shape[0])
        z, state = ttt_linear_minibatch(q.to(dt), k.to(dt), v.to(dt), self._eta(x, dt), self.inner_gain.to(dt),
                                        self.inner_bias.to(dt), state, start=meta.start, batch=self.mini_batch,
                                        eps=self.inner_eps)
        if cache is not None:
            cache.state = state
        y = F.layer_norm(self.merge_heads(z.to(x.dtype)), (self.dims.d_model,), self.out_gain, self.out_bias,
                         self.dims.norm_eps)
        return self.o_proj(y)

    def reference(self, x, meta: SeqMeta):
        q, k, v = self.reference_project(x)
        logits = torch.einsum("btd,hd->bht", x, self.lr_proj.weight) + self.lr_proj.bias[:, None]
        eta = self.base_lr / (1 + torch.exp(-logits)) / self.head_dim
        state = empty_state(self.w0, self.c0, x.shape[0])
        z, _ = ttt_linear_recurrent(q, k, v, eta, self.inner_gain, self.inner_bias, state, start=meta.start,
                                    batch=self.mini_batch, eps=self.inner_eps)
        y = z.transpose(1, 2).reshape(x.shape)
        y = (y - y.mean(-1, keepdim=True)) / torch.sqrt(y.var(-1, unbiased=False, keepdim=True) + self.dims.norm_eps)
        return torch.einsum("btd,ed->bte", y * self.out_gain + self.out_bias, self.o_proj.weight)

    def init_cache(self, kv_policy=None):
        return RecurrentState()

    def state_bytes(self, context_len: int, batch_size: int = 1, bytes_per_elem: int = 2) -> int:
        # W_0 and the gradient sum A (D x D), c_0 and a (D), per head, float32 or better
        elems = self.n_heads * 2 * (self.head_dim * self.head_dim + self.head_dim)
        return batch_size * elems * RecurrentState.bytes_per_elem(bytes_per_elem)

    def flops_breakdown(self, context_len: int, causal: bool = True) -> Flops:
        # per token and head: K W_0, Q W_0, Q A and the gradient sum K^T (eta G) (D x D each),
        # and the causal (L x L) Q K^T and its product with G over a mini-batch's visible pairs
        keys, d = chunk_visible_keys(context_len, self.mini_batch), self.head_dim
        matmul = self.n_heads * (8 * d * d + 4 * keys * d)
        return Flops(linear=self.projection_flops() + linear_flops(self.lr_proj), matmul=matmul)
