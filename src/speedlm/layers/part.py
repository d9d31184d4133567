"""What the models ask of every part of a layer, mixers (`layers/mixer.py`) and block kinds
(`layers/block.py`) alike: its cache, the state it holds, its FLOPs in both directions, how long
a sequence it serves, how far back it looks, and which weights write into the residual stream.
One contract, so that a block answers from its mixer and no caller checks for a method."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from speedlm.cache.base import LayerCache
from speedlm.layers.dims import ModelDims
from speedlm.layers.flops import Flops


class LayerPart(nn.Module):
    # its FLOPs follow values it learns (adaptive span's spans): a training budget recounts them
    # as it trains (`flops_per_token` reads the current values)
    data_dependent_flops: ClassVar[bool] = False

    def __init__(self, dims: ModelDims):
        super().__init__()
        self.dims = dims

    def init_cache(self, kv_policy=None) -> LayerCache:
        """An empty cache. `kv_policy` overrides the retention of KV caches (e.g. attention sinks
        on a full-attention model); parts without a KV cache ignore it."""
        raise NotImplementedError

    def state_bytes(self, context_len: int, batch_size: int = 1, bytes_per_elem: int = 2) -> int:
        """Inference state held after `context_len` tokens (KV entries or recurrent state)."""
        raise NotImplementedError

    def flops_per_token(self, context_len: int) -> float:
        """Forward FLOPs per token (2 per multiply-add) in a causal model, averaged over a
        sequence of context_len, under the one convention of layers/flops.py."""
        return self.flops_breakdown(context_len).total

    def bidirectional_flops_per_token(self, context_len: int) -> float:
        """Forward FLOPs per token when every query may see both sides (encoders, diffusion
        LMs); the same as the causal count unless the work grows with the keys a query sees."""
        return self.flops_breakdown(context_len, causal=False).total

    def flops_breakdown(self, context_len: int, causal: bool = True) -> Flops:
        """The forward count split by what FlopCounterMode sees (layers/flops.py): the part's
        Linear layers, its other matrix products, and the rest. Sums to `flops_per_token`
        (causal) or `bidirectional_flops_per_token`."""
        raise NotImplementedError

    def max_context(self, kv_policy=None) -> int | None:
        """How many tokens this part can process in one sequence; None = no limit (a bounded
        cache or a recurrent state generates as long as asked)."""
        return None

    def reach(self) -> int | None:
        """How many positions back one output can depend on the input (None: the whole
        context). A stack of layers reaches the sum of its layers' reaches (Transformer-XL:
        mem_len x layers)."""
        return None

    def learned_summary(self) -> dict:
        """Data-dependent values as the weights have them now (adaptive span: each head's span),
        for reports; empty for parts whose cost and state follow from their options alone."""
        return {}

    def residual_weights(self) -> list[torch.Tensor]:
        """The weights that write into the residual stream (scaled by 1/sqrt(2 n_layers))."""
        raise NotImplementedError
