"""Decoder-only language model: embedding, pre-norm blocks (mixer + FFN), final norm, LM head."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from speedlm.cache.base import ModelCache
from speedlm.errors import SpeedlmError
from speedlm.layers.dims import ModelDims
from speedlm.layers.mixer import SeqMeta
from speedlm.layers.mlp import SwiGLU
from speedlm.layers.norm import RMSNorm
from speedlm.models.config import ModelConfig
from speedlm.models.registry import build_mixer


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: dict):
        super().__init__()
        dims = ModelDims(cfg.d_model, cfg.n_heads, cfg.rope_theta)
        self.mixer_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = build_mixer(spec, dims)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps) if cfg.ffn != "none" else None
        self.ffn = SwiGLU(cfg.d_model, cfg.hidden_dim) if cfg.ffn != "none" else None

    def forward(self, x, meta: SeqMeta, cache=None):
        x = x + self.mixer(self.mixer_norm(x), meta, cache)
        if self.ffn is not None:
            x = x + self.ffn(self.ffn_norm(x))
        return x

    def flops_per_token(self, context_len: int) -> float:
        ffn = self.ffn.flops_per_token() if self.ffn is not None else 0.0
        return self.mixer.flops_per_token(context_len) + ffn


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, spec) for spec in config.layer_specs())
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # GPT-2 init: N(0, std); output projections of residual branches scaled by 1/sqrt(2L)
        std = self.config.init_std
        resid_std = std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue
            last = name.rsplit(".", 2)[-2] if name.count(".") else name
            nn.init.normal_(p, 0.0, resid_std if last in ("o_proj", "down") else std)

    # ----- forward -----
    def forward(self, input_ids: torch.Tensor, cache: ModelCache | None = None) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V). With a cache, the tokens continue from cache.seen."""
        start = 0 if cache is None else cache.seen
        t = input_ids.shape[1]
        if start + t > self.config.max_seq_len:
            raise SpeedlmError(
                f"sequence of {start + t} tokens is longer than this model allows "
                f"(max_seq_len={self.config.max_seq_len})"
            )
        meta = SeqMeta(start=start, causal=True, token_ids=input_ids)
        x = self.embed(input_ids)
        for i, block in enumerate(self.blocks):
            x = block(x, meta, None if cache is None else cache.layers[i])
        if cache is not None:
            cache.seen += t
        return self.lm_head(self.norm(x))

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self(input_ids)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)

    def init_cache(self) -> ModelCache:
        return ModelCache([b.mixer.init_cache() for b in self.blocks])

    # ----- accounting -----
    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # tied weights are counted once
        if non_embedding:
            n -= self.embed.weight.numel()
        return n

    def flops_per_token(self, context_len: int, training: bool = True) -> float:
        """Analytic FLOPs per token for sequences of `context_len`: mixers (window-, GQA- and
        state-aware), FFNs and LM head; training counts backward as 2x forward."""
        fwd = sum(b.flops_per_token(context_len) for b in self.blocks)
        fwd += 2.0 * self.config.d_model * self.config.vocab_size
        return 3.0 * fwd if training else fwd

    def state_bytes(self, context_len: int, batch_size: int = 1, bytes_per_elem: int = 2) -> int:
        """Inference cache size after context_len tokens, summed over layers."""
        return sum(b.mixer.state_bytes(context_len, batch_size, bytes_per_elem) for b in self.blocks)
