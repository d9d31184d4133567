"""Blocks: how a layer wires its mixer and FFN around the residual stream. Registered by name
(`prenorm` now; Conformer's macaron block and parallel heads come later) and chosen per layer
in the config. The model only asks blocks (for caches, state size, FLOPs, context limits and
residual projections); it never reaches into a mixer."""

from __future__ import annotations

import torch
from torch import nn

from speedlm.layers.dims import ModelDims
from speedlm.layers.flops import Flops
from speedlm.layers.mixer import SeqMeta
from speedlm.layers.norm import RMSNorm
from speedlm.layers.part import LayerPart
from speedlm.registry import FFNS, MIXERS


class Block(LayerPart):
    """The contract every block kind satisfies: `LayerPart` (caches, state, FLOPs both ways,
    context limit, reach, residual weights) and the flags below. A block kind that wraps others
    (Mixture-of-Depths) is a Block too, so no caller needs to know which kind it holds."""

    supports_reversible = False

    def forward(self, x: torch.Tensor, meta: SeqMeta, cache=None) -> torch.Tensor:
        raise NotImplementedError

    @property
    def supports_decoding(self) -> bool:
        raise NotImplementedError

    @property
    def data_dependent_state(self) -> bool:
        """The state after T tokens depends on which tokens they are (`state_bytes` estimates)."""
        raise NotImplementedError

    @property
    def supports_prefix_cache(self) -> bool:
        """Bidirectional calls may pass this block a cache that reads a frozen prefix (a layer
        cache with `serves_bidirectional`, e.g. masked diffusion's PrefixCache)."""
        return False


class LayerBlock(Block):
    """A block built from its layer's mixer and FFN specs. Subclasses add norms and wiring
    (`forward`) and any extra parts: their state (override `init_cache` with a CompositeCache
    and `state_bytes`), their FLOPs (`own_flops_per_token`, counted in both directions) and how
    far back they look (`own_reach`, added to the mixer's). A block that is two residual branches
    (`mix_branch`, `ffn_branch`, `branch_parameters`) sets `supports_reversible` and can run in
    reversible models."""

    def __init__(self, dims: ModelDims, mixer: dict, ffn: dict):
        super().__init__(dims)
        self.mixer = MIXERS.build(mixer, dims)
        built = FFNS.build(ffn, dims)
        self.ffn = None if built.is_empty else built

    # ----- what the model asks -----
    @property
    def supports_decoding(self) -> bool:
        return self.mixer.supports_decoding

    @property
    def data_dependent_state(self) -> bool:
        return self.mixer.data_dependent_state

    def init_cache(self, kv_policy=None):
        return self.mixer.init_cache(kv_policy)

    def state_bytes(self, context_len: int, batch_size: int = 1, bytes_per_elem: int = 2) -> int:
        return self.mixer.state_bytes(context_len, batch_size, bytes_per_elem)

    def flops_per_token(self, context_len: int) -> float:
        return self.mixer.flops_per_token(context_len) + self._ffn_flops() + self.own_flops_per_token()

    def bidirectional_flops_per_token(self, context_len: int) -> float:
        return self.mixer.bidirectional_flops_per_token(context_len) + self._ffn_flops() + self.own_flops_per_token()

    def _ffn_flops(self) -> float:
        return self.ffn.flops_per_token() if self.ffn is not None else 0.0

    def own_flops_per_token(self) -> float:
        """FLOPs of the block's parts beside its mixer and FFN (none in the base block)."""
        return 0.0

    def flops_breakdown(self, context_len: int, causal: bool = True) -> Flops:
        ffn = self.ffn.flops_breakdown() if self.ffn is not None else Flops()
        return self.mixer.flops_breakdown(context_len, causal) + ffn + self.own_flops_breakdown(causal)

    def own_flops_breakdown(self, causal: bool = True) -> Flops:
        """`own_flops_per_token` split as layers/flops.py says (by default all of it elementwise)."""
        return Flops(other=self.own_flops_per_token())

    def max_context(self, kv_policy=None) -> int | None:
        return self.mixer.max_context(kv_policy)

    def reach(self) -> int | None:
        mixer = self.mixer.reach()
        return None if mixer is None else mixer + self.own_reach()

    def learned_summary(self) -> dict:
        return self.mixer.learned_summary()

    @property
    def data_dependent_flops(self) -> bool:
        return self.mixer.data_dependent_flops

    def own_reach(self) -> int:
        """Positions back that the block's own parts look (a causal convolution: kernel - 1)."""
        return 0

    def residual_weights(self) -> list[torch.Tensor]:
        return self.mixer.residual_weights() + (self.ffn.residual_weights() if self.ffn is not None else [])


class PreNormBlock(LayerBlock):
    """x + mixer(norm(x)), then x + ffn(norm(x)) (GPT-2 / Llama). Its two branches also serve
    the reversible residual (models/reversible.py). The FFN runs over `dims.ffn_chunks` pieces
    of the sequence (Reformer's chunked FFN: a position-wise FFN gives the same result). It
    saves memory where the hidden activations are not kept for a backward pass: without
    gradients, and in the reversible backward, which recomputes the FFN piece by piece; under
    ordinary autograd every piece's activations are kept anyway."""

    supports_reversible = True

    def __init__(self, dims: ModelDims, mixer: dict, ffn: dict):
        super().__init__(dims, mixer, ffn)
        self.mixer_norm = RMSNorm(dims.d_model, dims.norm_eps)
        self.ffn_norm = RMSNorm(dims.d_model, dims.norm_eps) if self.ffn is not None else None

    @property
    def supports_prefix_cache(self) -> bool:
        return self.mixer.supports_prefix_cache  # the block has no state beside its mixer's

    def forward(self, x, meta: SeqMeta, cache=None):
        x = x + self.mix_branch(x, meta, cache)
        if self.ffn is not None:
            x = x + self.ffn_branch(x, meta)
        return x

    def mix_branch(self, x, meta: SeqMeta, cache=None) -> torch.Tensor:
        return self.mixer(self.mixer_norm(x), meta, cache)

    def ffn_branch(self, x, meta: SeqMeta) -> torch.Tensor:
        if self.dims.ffn_chunks == 1 or x.shape[1] <= 1:
            return self.ffn(self.ffn_norm(x), meta)
        return torch.cat([self.ffn(self.ffn_norm(piece), meta) for piece in ffn_pieces(x, self.dims.ffn_chunks)], dim=1)

    def branch_parameters(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """The mixer branch's parameters, and the FFN branch's."""
        mix = [*self.mixer.parameters(), *self.mixer_norm.parameters()]
        ffn = [] if self.ffn is None else [*self.ffn.parameters(), *self.ffn_norm.parameters()]
        return mix, ffn


def ffn_pieces(x: torch.Tensor, chunks: int) -> tuple[torch.Tensor, ...]:
    """The sequence split into `chunks` pieces along time (fewer when it is shorter)."""
    return x.tensor_split(min(chunks, x.shape[1]), dim=1)
