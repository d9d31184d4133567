"""Multi-head projections shared by every mixer that has queries, keys, values and an output
projection (softmax attention, linear attention, and the linear-attention family to come), so
that no mixer re-implements the projections or the head split and merge."""

from __future__ import annotations

from typing import Annotated

import torch
from torch import nn

from speedlm.errors import SpeedlmError
from speedlm.layers.dims import ModelDims
from speedlm.layers.mixer import Mixer, linear_flops
from speedlm.layers.norm import RMSNorm
from speedlm.registry import Range


class HeadsMixer(Mixer):
    """q/k/v/o projections over `n_heads` query heads and `kv_heads` key/value heads (GQA when
    fewer). Queries and keys are `key_dim` wide per head, values (and what the output projection
    reads) `value_dim`; both default to the model's head_dim (softmax attention), and linear
    recurrences choose their own (GLA: half-width keys, RetNet: double-width values). Fast forms
    use `project` / `output`; references use `reference_project` / `reference_output`, which
    compute the same maps from the weights with einsums, independently of the view/transpose
    plumbing of the fast path.

    `qkv_bias`: biases on the q, k and v projections, not the output (Qwen2). `qk_norm`: an
    RMSNorm with a learned gain over each head's key_dim on queries and keys, right after the
    projection (before any rotation: Qwen3's q_norm / k_norm), eps = dims.norm_eps."""

    @classmethod
    def check_options(cls, dims: ModelDims, kv_heads: int | None = None, **options) -> None:
        if kv_heads is not None and dims.n_heads % kv_heads:
            raise SpeedlmError(f"kv_heads={kv_heads} must be a positive divisor of n_heads={dims.n_heads}")

    def __init__(
        self,
        dims: ModelDims,
        kv_heads: Annotated[int | None, Range(min=1)] = None,
        key_dim: int | None = None,
        value_dim: int | None = None,
        qkv_bias: bool = False,
        qk_norm: bool = False,
    ):
        super().__init__(dims)
        self.n_heads = dims.n_heads
        self.kv_heads = dims.n_heads if kv_heads is None else kv_heads
        self.head_dim = dims.head_dim
        self.key_dim = dims.head_dim if key_dim is None else key_dim
        self.value_dim = dims.head_dim if value_dim is None else value_dim
        d, dk, dv = dims.d_model, self.key_dim, self.value_dim
        self.q_proj = nn.Linear(d, self.n_heads * dk, bias=qkv_bias)
        self.k_proj = nn.Linear(d, self.kv_heads * dk, bias=qkv_bias)
        self.v_proj = nn.Linear(d, self.kv_heads * dv, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * dv, d, bias=False)
        self.q_norm = RMSNorm(dk, dims.norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(dk, dims.norm_eps) if qk_norm else None

    def reset_parameters(self) -> None:
        super().reset_parameters()  # N(0, init_std) projections, zero biases
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                norm.reset_parameters()

    # ----- fast path -----
    def split_heads(self, y: torch.Tensor, heads: int) -> torch.Tensor:
        """(B, T, heads * Dh) -> (B, heads, T, Dh)."""
        b, t, _ = y.shape
        return y.view(b, t, heads, -1).transpose(1, 2)

    def merge_heads(self, y: torch.Tensor) -> torch.Tensor:
        """(B, H, T, Dh) -> (B, T, H * Dh)."""
        b, _, t, _ = y.shape
        return y.transpose(1, 2).reshape(b, t, -1)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, D) -> q (B, H, T, Dh), k and v (B, Hkv, T, Dh)."""
        q = self.split_heads(self.q_proj(x), self.n_heads)
        k = self.split_heads(self.k_proj(x), self.kv_heads)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, self.split_heads(self.v_proj(x), self.kv_heads)

    def output(self, y_bhtd: torch.Tensor) -> torch.Tensor:
        return self.o_proj(self.merge_heads(y_bhtd))

    def projection_flops(self) -> float:
        return linear_flops(self.q_proj, self.k_proj, self.v_proj, self.o_proj)

    # ----- references -----
    @staticmethod
    def _heads_of(x: torch.Tensor, weight: torch.Tensor, heads: int, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = torch.einsum("btd,hed->bhte", x, weight.view(heads, -1, x.shape[-1]))
        return y if bias is None else y + bias.view(heads, 1, -1)

    @staticmethod
    def _rms_reference(y: torch.Tensor, norm: RMSNorm | None) -> torch.Tensor:
        if norm is None:
            return y
        return y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight

    def reference_project(self, x):
        q = self._heads_of(x, self.q_proj.weight, self.n_heads, self.q_proj.bias)
        k = self._heads_of(x, self.k_proj.weight, self.kv_heads, self.k_proj.bias)
        v = self._heads_of(x, self.v_proj.weight, self.kv_heads, self.v_proj.bias)
        return self._rms_reference(q, self.q_norm), self._rms_reference(k, self.k_norm), v

    def reference_output(self, y_bhtd):
        w = self.o_proj.weight.view(-1, self.n_heads, self.value_dim)
        return torch.einsum("bhte,dhe->btd", y_bhtd, w)
