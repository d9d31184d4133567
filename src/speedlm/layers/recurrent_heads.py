"""What the multi-head linear recurrences share (RetNet, GLA, DeltaNet, Gated DeltaNet): the
q/k/v projections of `HeadsMixer` with their own key and value widths, a per-head output norm,
an optional output gate, and the float32 matrix-state cache.

    y = o_proj( norm_per_head(recurrence(q, k, v, ...)) * silu(g_proj(x)) )

Fast forms call `gated_output`; references call `reference_gated_output`, which writes the norm
and the gate out from the weights, independently of the fast path.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from speedlm.cache.recurrent import RecurrentState
from speedlm.layers.dims import ModelDims
from speedlm.layers.flops import attention_flops, chunk_visible_keys
from speedlm.layers.heads import HeadsMixer


class HeadNorm(nn.Module):
    """Normalisation over each head's channels with one gain (and bias) shared by the heads:
    "rms" (RMSNorm, what GLA and DeltaNet use) or "layer" (LayerNorm per head = GroupNorm with
    one group per head, RetNet)."""

    def __init__(self, dim: int, kind: Literal["rms", "layer"] = "rms", eps: float = 1e-6):
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if kind == "layer" else None

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.kind == "layer":
            return F.layer_norm(y, (y.shape[-1],), self.weight, self.bias, self.eps)
        return F.rms_norm(y, (y.shape[-1],), self.weight, self.eps)

    def reference(self, y: torch.Tensor) -> torch.Tensor:
        if self.kind == "layer":
            y = y - y.mean(-1, keepdim=True)
            out = y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
            return out + self.bias
        return y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class GatedHeadsMixer(HeadsMixer):
    """Base for linear recurrences over heads with a matrix state (B, H, Dk, Dv) kept in a
    RecurrentState. Subclasses implement `mix` / `reference` with `gated_output` and
    `reference_gated_output`, and say how many state elements a head holds."""

    def __init__(self, dims: ModelDims, key_dim: int, value_dim: int, norm: Literal["rms", "layer"] = "rms",
                 gate: bool = True, chunk_size: int = 64):
        super().__init__(dims, None, key_dim, value_dim)
        d = dims.d_model
        self.chunk_size = chunk_size
        self.g_proj = nn.Linear(d, self.n_heads * value_dim, bias=False) if gate else None
        self.out_norm = HeadNorm(value_dim, norm, dims.norm_eps)

    def reset_parameters(self) -> None:
        super().reset_parameters()  # N(0, init_std) for every projection
        self.out_norm.reset_parameters()

    # ----- output -----
    def gated_output(self, y_bhtd: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = self.merge_heads(self.out_norm(y_bhtd.to(x.dtype)))
        if self.g_proj is not None:
            y = y * F.silu(self.g_proj(x))
        return self.o_proj(y)

    def reference_gated_output(self, y_bhtd: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = self.out_norm.reference(y_bhtd)
        if self.g_proj is not None:
            gate = self._heads_of(x, self.g_proj.weight, self.n_heads)  # (B, H, T, Dv)
            y = y * gate * torch.sigmoid(gate)
        return self.reference_output(y)

    # ----- state -----
    def state_elements_per_head(self) -> int:
        return self.key_dim * self.value_dim

    def init_cache(self, kv_policy=None):
        return RecurrentState()

    def state_bytes(self, context_len: int, batch_size: int = 1, bytes_per_elem: int = 2) -> int:
        return batch_size * self.n_heads * self.state_elements_per_head() * RecurrentState.bytes_per_elem(bytes_per_elem)

    def recurrence_dtype(self, x: torch.Tensor) -> torch.dtype:
        return RecurrentState.dtype_for(x.dtype)

    def projection_flops(self) -> float:
        extra = 2.0 * self.g_proj.in_features * self.g_proj.out_features if self.g_proj is not None else 0.0
        return super().projection_flops() + extra

    def chunked_flops(self, context_len: int) -> float:
        """Per token, the chunked form (ops/gla.py): scores and mix over the causal half of each
        C x C chunk (its visible pairs: Dk per score, Dv per value), the carried state read
        (Dk x Dv) and the chunk's contribution to the state (Dk x Dv)."""
        keys, dk, dv = chunk_visible_keys(context_len, self.chunk_size), self.key_dim, self.value_dim
        return self.n_heads * (attention_flops(1, keys, dk, dv) + 2 * dk * dv + 2 * dk * dv)
