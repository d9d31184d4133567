"""Decoder-only language model: embedding, blocks (built from the config's layer specs), final
norm, LM head. Nothing here knows a mixer family: it asks blocks for caches, state sizes,
FLOPs and context limits."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from speedlm.cache.base import ModelCache
from speedlm.errors import SpeedlmError
from speedlm.layers.context import AuxLosses, SeqMeta
from speedlm.layers.norm import RMSNorm
from speedlm.models.config import ModelConfig
from speedlm.models.stack import build_blocks, data_dependent_flops, reset_children, run_blocks, scale_residuals


@dataclass(frozen=True)
class Loss:
    """`total` is what training minimises; `parts` names its terms: "lm" (the cross-entropy,
    what evaluation reports) and every auxiliary loss the modules added; `metrics` are numbers
    the modules reported that are not losses (logged, never minimised). Unpacks as
    `total, parts = model.loss(...)`."""

    total: torch.Tensor
    parts: dict[str, torch.Tensor]
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)

    def __iter__(self):
        return iter((self.total, self.parts))


def lm_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The language-model loss: mean next-token cross-entropy in float32, targets of -100 left out."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)


def _min_limit(limits) -> int | None:
    bounded = [n for n in limits if n is not None]
    return min(bounded) if bounded else None


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = build_blocks(config)
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self._init_outer()

    # ----- initialisation -----
    def _init_outer(self) -> None:
        """What the model owns: embeddings and head N(0, init_std) (GPT-2), and the residual
        scaling: every projection that writes into the residual stream is scaled by
        1/sqrt(2 n_layers), so the stream's variance does not grow with depth."""
        std = self.config.init_std
        nn.init.normal_(self.embed.weight, 0.0, std)
        if not self.config.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, 0.0, std)
        scale_residuals(self.blocks, self.config.n_layers)

    def reset_parameters(self) -> None:
        """Re-initialise everything (e.g. after building on the meta device and `to_empty`):
        every module's own `reset_parameters`, children before parents so that a mixer's
        initialisation of its projections wins over nn.Linear's default, then the model's part.
        Re-ties the head to the embedding (`to_empty` unties them)."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        reset_children(self)
        self._init_outer()

    # ----- forward -----
    def forward(
        self,
        input_ids: torch.Tensor,
        cache: ModelCache | None = None,
        *,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        aux: AuxLosses | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V). With a cache, the tokens continue from cache.seen.
        positions (B, T): per-row positions (default: contiguous from cache.seen); doc_ids (B, T):
        packed documents that must not mix (training only); aux: collects auxiliary losses."""
        start = 0 if cache is None else cache.seen
        t = input_ids.shape[1]
        limit = self.max_context() if cache is None else cache.max_context
        if limit is not None and start + t > limit:
            raise SpeedlmError(
                f"sequence of {start + t} tokens is longer than this model allows "
                f"(max_seq_len={limit}; models whose caches are bounded have no such limit)"
            )
        meta = SeqMeta(start=start, causal=True, token_ids=input_ids, positions=positions, doc_ids=doc_ids, aux=aux)
        x = self.embed(input_ids)
        x = run_blocks(self.blocks, x, meta, None if cache is None else cache.layers, self.config.reversible)
        if cache is not None:
            cache.seen += t
        return self.lm_head(self.norm(x))

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor, **meta) -> Loss:
        aux = AuxLosses()
        logits = self(input_ids, aux=aux, **meta)
        lm = lm_cross_entropy(logits, targets)
        return Loss(lm + aux.total(), {"lm": lm, **aux.parts}, aux.metrics)

    def init_cache(self, kv_policy=None) -> ModelCache:
        """Empty caches for every layer; `kv_policy` overrides the retention of every KV cache
        (layers without one ignore it)."""
        return ModelCache(
            [b.init_cache(kv_policy) for b in self.blocks],
            max_context=_min_limit(b.max_context(kv_policy) for b in self.blocks),
        )

    def max_context(self, kv_policy=None) -> int | None:
        """The longest sequence this model can process (None: no limit)."""
        return _min_limit(b.max_context(kv_policy) for b in self.blocks)

    def context_reach(self) -> int | None:
        """How far back the last layer's output can depend on the input: the sum of the layers'
        reaches (None when a layer sees its whole context)."""
        reaches = [b.reach() for b in self.blocks]
        return None if any(r is None for r in reaches) else sum(reaches)

    def learned_summary(self, cache: ModelCache | None = None) -> list[dict]:
        """Per layer, the data-dependent values the model has now (spans as learned) and, given a
        cache that has seen tokens, how those tokens were routed (Mixture-of-Depths: the share
        that went through the routed block, against its capacity)."""
        return [
            {**block.learned_summary(), **(cache.layers[i].summary() if cache is not None else {})}
            for i, block in enumerate(self.blocks)
        ]

    # ----- accounting -----
    @property
    def data_dependent_flops(self) -> bool:
        """Its FLOPs per token follow values it learns (a training budget recounts them)."""
        return data_dependent_flops(self.blocks)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # tied weights are counted once
        if non_embedding:
            n -= self.embed.weight.numel()
        return n

    def num_active_params(self) -> int:
        """Parameters one token passes through: routed parts (MoE) count only what a token
        uses (their `num_active_params`); everything else counts in full."""
        n = self.num_params()
        for m in self.modules():
            if m is not self and hasattr(m, "num_active_params"):
                n -= sum(p.numel() for p in m.parameters()) - m.num_active_params()
        return n

    def flops_per_token(self, context_len: int, training: bool = True) -> float:
        """Analytic FLOPs per token for sequences of `context_len`: blocks (window-, GQA- and
        state-aware), and the LM head; training counts backward as 2x forward."""
        fwd = sum(b.flops_per_token(context_len) for b in self.blocks)
        fwd += 2.0 * self.config.d_model * self.config.vocab_size
        return 3.0 * fwd if training else fwd

    def state_bytes(self, context_len: int, batch_size: int = 1, bytes_per_elem: int = 2) -> int:
        """Inference cache size after context_len tokens, summed over layers."""
        return sum(b.state_bytes(context_len, batch_size, bytes_per_elem) for b in self.blocks)
