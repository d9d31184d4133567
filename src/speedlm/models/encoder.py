"""Bidirectional encoder with a classification head (objective "classify"): the same layer
specs, blocks and mixers as `CausalLM`, run with `SeqMeta(causal=False)` and no cache.

A front-end maps each input token to d_model: a linear projection of continuous features
(`input_dim` > 0: image patches, log-mel frames) or an embedding of ids (`input_dim` = 0,
`vocab_size` ids). Pooling is the mean over positions or a learned class token prepended to
the sequence (`pooling`); a final norm and a linear head give `num_classes` logits. Positions
come from the mixers (RoPE in attention); a mixer that cannot run bidirectionally is refused
when the config is checked.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from speedlm.layers.context import AuxLosses, SeqMeta
from speedlm.layers.norm import RMSNorm
from speedlm.models.causal_lm import Loss
from speedlm.models.config import ModelConfig
from speedlm.models.stack import build_blocks, data_dependent_flops, reset_children, run_blocks, scale_residuals


class Encoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        d = config.d_model
        self.front = nn.Linear(config.input_dim, d) if config.input_dim else nn.Embedding(config.vocab_size, d)
        self.cls_token = nn.Parameter(torch.empty(d)) if config.pooling == "cls" else None
        self.blocks = build_blocks(config)
        self.norm = RMSNorm(d, config.norm_eps)
        self.head = nn.Linear(d, config.num_classes)
        self._init_outer()

    def _init_outer(self) -> None:
        std = self.config.init_std
        nn.init.normal_(self.front.weight, 0.0, std)
        if isinstance(self.front, nn.Linear):
            nn.init.zeros_(self.front.bias)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, 0.0, std)
        nn.init.normal_(self.head.weight, 0.0, std)
        nn.init.zeros_(self.head.bias)
        scale_residuals(self.blocks, self.config.n_layers)

    def reset_parameters(self) -> None:
        reset_children(self)
        self._init_outer()

    def forward(self, inputs: torch.Tensor, aux: AuxLosses | None = None) -> torch.Tensor:
        """inputs (B, T, input_dim) features, or (B, T) ids when input_dim is 0 -> logits (B, C)."""
        x = self.encode(inputs, aux)
        return self.head(x[:, 0] if self.cls_token is not None else x.mean(dim=1))

    def encode(self, inputs: torch.Tensor, aux: AuxLosses | None = None) -> torch.Tensor:
        """The final-norm hidden states (B, T (+1 with a class token), D), before pooling."""
        if isinstance(self.front, nn.Linear):
            inputs = inputs.to(self.front.weight.dtype)  # float32 task features into a bf16 model
        x = self.front(inputs)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], 1, -1).to(x.dtype), x], dim=1)
        t = x.shape[1]
        if t > self.config.max_seq_len:
            from speedlm.errors import SpeedlmError

            raise SpeedlmError(f"input of {t} tokens is longer than this encoder allows (max_seq_len={self.config.max_seq_len})")
        meta = SeqMeta(causal=False, aux=aux)
        return self.norm(run_blocks(self.blocks, x, meta, reversible=self.config.reversible))

    def loss(self, inputs: torch.Tensor, labels: torch.Tensor) -> Loss:
        aux = AuxLosses()
        logits = self(inputs, aux=aux)
        ce = F.cross_entropy(logits.float(), labels)
        return Loss(ce + aux.total(), {"ce": ce, **aux.parts}, aux.metrics)

    # ----- accounting -----
    @property
    def data_dependent_flops(self) -> bool:
        """Its FLOPs per token follow values it learns (a training budget recounts them)."""
        return data_dependent_flops(self.blocks)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and isinstance(self.front, nn.Embedding):
            n -= self.front.weight.numel()
        return n

    def state_bytes(self, context_len: int, batch_size: int = 1, bytes_per_elem: int = 2) -> int:
        return 0  # an encoder keeps no state between calls

    def max_context(self, kv_policy=None) -> int:
        return self.config.max_seq_len

    def benchmark_targets(self, next_tokens: torch.Tensor) -> torch.Tensor:
        """Labels for a benchmark batch of token ids (B, T): one class per row."""
        return next_tokens[:, 0] % self.config.num_classes

    def flops_per_token(self, context_len: int, training: bool = True) -> float:
        fwd = sum(b.bidirectional_flops_per_token(context_len) for b in self.blocks)
        fwd += 2.0 * self.front.weight.numel() if isinstance(self.front, nn.Linear) else 0.0
        return 3.0 * fwd if training else fwd
