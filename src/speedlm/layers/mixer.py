"""The token-mixer contract every architecture implements.

A mixer maps x (B, T, D) -> y (B, T, D). One `forward` serves training (cache=None), prefill
(empty cache, T > 1), chunked prefill (non-empty cache, T > 1) and decoding (T == 1); the cache
is updated in place. Sequence metadata travels in `SeqMeta`.

Subclasses implement `mix` (the forward proper); `forward` first checks the call against the
declared capabilities, so no mixer can silently ignore `causal=False`, document boundaries or
a cache it cannot use.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from speedlm.cache.base import LayerCache
from speedlm.errors import SpeedlmError
from speedlm.layers.context import AuxLosses, SeqMeta
from speedlm.layers.part import LayerPart

__all__ = ["AuxLosses", "Mixer", "SeqMeta", "check_call", "linear_flops", "init_linears"]


def check_call(module: nn.Module, meta: SeqMeta, cache) -> None:
    """Refuse a call the module has not declared it can serve (one line for the user)."""
    name = type(module).__name__
    if meta.causal and not module.supports_causal:
        raise SpeedlmError(f"{name} is bidirectional-only; it cannot run in a causal model")
    if not meta.causal and not module.supports_bidirectional:
        raise SpeedlmError(f"{name} is causal-only; it cannot run with causal=False (bidirectional)")
    if cache is not None:
        if not meta.causal:
            if cache.serves_bidirectional and module.supports_prefix_cache:
                return  # a frozen prefix for bidirectional calls (masked diffusion's approximate cache)
            raise SpeedlmError(f"{name}: a bidirectional call takes no cache (other than a prefix cache, where supported)")
        if not module.supports_decoding:
            raise SpeedlmError(f"{name} has no incremental decoding; call it without a cache")
        if meta.doc_ids is not None:
            raise SpeedlmError(f"{name}: document boundaries are for training; decode one document per cache")
    if meta.doc_ids is not None and not module.supports_doc_ids:
        raise SpeedlmError(f"{name} does not support document boundaries (doc_ids); train it on unpacked sequences")


def init_linears(module: nn.Module, std: float) -> None:
    """N(0, std) weights and zero biases for every nn.Linear under `module` (GPT-2 style)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class Mixer(LayerPart):
    """Base class. Subclasses set the capability flags, implement `mix`, `reference` and the
    `LayerPart` methods (cache, state, FLOPs; context limit and reach where they have one), and
    call `self.reset_parameters()` at the end of `__init__`."""

    supports_causal: ClassVar[bool] = True
    supports_bidirectional: ClassVar[bool] = False
    supports_decoding: ClassVar[bool] = True
    supports_doc_ids: ClassVar[bool] = False
    # bidirectional calls may read a frozen prefix's keys from a cache that `serves_bidirectional`
    # (`LayerCache.bidirectional_keys`)
    supports_prefix_cache: ClassVar[bool] = False
    # the state after T tokens depends on which tokens they are (SepLLM keeps separators);
    # `state_bytes` is then an estimate at a typical rate, between a window and the full cache
    data_dependent_state: ClassVar[bool] = False
    # submodules whose output enters the residual stream: the model scales their weights by
    # 1/sqrt(2 n_layers) after init (GPT-2)
    residual_out: ClassVar[tuple[str, ...]] = ("o_proj",)

    def forward(self, x: torch.Tensor, meta: SeqMeta, cache: LayerCache | None = None) -> torch.Tensor:
        check_call(self, meta, cache)
        return self.mix(x, meta, cache)

    def mix(self, x: torch.Tensor, meta: SeqMeta, cache: LayerCache | None) -> torch.Tensor:
        raise NotImplementedError

    def reference(self, x: torch.Tensor, meta: SeqMeta) -> torch.Tensor:
        """The same function through the naive op (dense mask / loop over time), no cache."""
        raise NotImplementedError

    def reset_parameters(self) -> None:
        """Initialise every parameter of this mixer (overridden where the paper prescribes more
        than N(0, init_std) projections, e.g. Mamba's A_log and dt bias)."""
        init_linears(self, self.dims.init_std)

    def residual_weights(self) -> list[torch.Tensor]:
        return [getattr(self, name).weight for name in self.residual_out]


def linear_flops(*modules: nn.Linear) -> float:
    """Forward FLOPs per token of a chain of Linear layers."""
    return float(sum(2 * m.in_features * m.out_features for m in modules))
