"""Masked diffusion language model (objective "diffusion"): MDLM (Sahoo et al. 2024,
arXiv:2406.07524) / LLaDA (Nie et al. 2025, arXiv:2502.09992).

The backbone is the layer specs' blocks run bidirectionally (`SeqMeta(causal=False)`; the only
cache is the approximate prefix cache of generation); the vocabulary gains one mask token (id `vocab_size`), which the head never predicts.

Training: per row a time t in (0, 1], drawn low-discrepancy across the batch
(t_i = (u + i / B) mod 1, one uniform u per batch); every token is masked with probability
p = (1 - eps) t + eps (LLaDA's floor eps = 1e-3, so no row is left unmasked); the loss is the
cross-entropy on the masked tokens weighted by 1 / p, summed and divided by the number of
tokens. Its expectation is the NELBO: an upper bound on the per-token negative log-likelihood,
so exp(loss) bounds the perplexity from above. Evaluation draws t and the masks from a fixed
seed, so validation losses are comparable between runs and checkpoints.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from speedlm.cache.prefix import PrefixCache
from speedlm.layers.context import AuxLosses, SeqMeta
from speedlm.layers.norm import RMSNorm
from speedlm.models.causal_lm import Loss
from speedlm.models.config import ModelConfig
from speedlm.models.stack import build_blocks, data_dependent_flops, reset_children, run_blocks, scale_residuals

MASK_FLOOR = 1e-3  # LLaDA's eps: p = (1 - eps) t + eps
EVAL_SEED = 1234  # validation's masks: the same for every evaluation


def _fingerprint(ids: torch.Tensor) -> int:
    """A deterministic integer from a batch's token ids (a seed per evaluation batch)."""
    weights = torch.arange(1, ids.numel() + 1, device=ids.device, dtype=torch.int64) % 65521
    return int((ids.flatten().long() * weights).sum() % 2_147_483_647)


def mask_probability(t: torch.Tensor, eps: float = MASK_FLOOR) -> torch.Tensor:
    return (1.0 - eps) * t + eps


def low_discrepancy_times(batch: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """(B,) times in [0, 1): one uniform offset and B evenly spaced points (stratified over rows)."""
    u = torch.rand((), generator=generator)
    return ((u + torch.arange(batch) / batch) % 1.0).to(device)


class DiffusionLM(nn.Module):
    bound = True  # its loss is the NELBO: evaluation reports an upper bound on perplexity

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.mask_id = config.vocab_size
        self.embed = nn.Embedding(config.vocab_size + 1, config.d_model)
        self.blocks = build_blocks(config)
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self._init_outer()

    def _init_outer(self) -> None:
        std = self.config.init_std
        nn.init.normal_(self.embed.weight, 0.0, std)
        nn.init.normal_(self.lm_head.weight, 0.0, std)
        scale_residuals(self.blocks, self.config.n_layers)

    def reset_parameters(self) -> None:
        reset_children(self)
        self._init_outer()

    def forward(self, input_ids: torch.Tensor, cache: list[PrefixCache] | None = None, *, start: int = 0,
                aux: AuxLosses | None = None, **_) -> torch.Tensor:
        """input_ids (B, T), mask tokens included -> logits (B, T, vocab_size) for every position.
        `cache`: one PrefixCache per layer (`init_prefix_cache`): recording, or frozen with the
        keys of the `start` positions before input_ids."""
        t = input_ids.shape[1]
        if start + t > self.config.max_seq_len:
            from speedlm.errors import SpeedlmError

            raise SpeedlmError(f"sequence of {start + t} tokens is longer than this model allows (max_seq_len={self.config.max_seq_len})")
        meta = SeqMeta(start=start, causal=False, token_ids=input_ids, aux=aux)
        x = self.embed(input_ids)
        return self.lm_head(self.norm(run_blocks(self.blocks, x, meta, cache, self.config.reversible)))

    def corrupt(self, x0: torch.Tensor, generator: torch.Generator | None = None):
        """(masked input, mask (B, T) bool, p (B, 1)): each token masked with probability p(t_row)."""
        b, t = x0.shape
        p = mask_probability(low_discrepancy_times(b, generator, x0.device))[:, None]
        u = torch.rand((b, t), generator=generator).to(x0.device)
        masked = u < p
        return torch.where(masked, torch.full_like(x0, self.mask_id), x0), masked, p

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, **_) -> Loss:
        """The NELBO estimate for the clean sequences `input_ids` (the trainer's next-token
        `targets` are not used: a diffusion LM denoises the window itself)."""
        # evaluation: masks drawn from the batch's own tokens, so every batch has its own t and
        # masks (an unbiased estimate over the split) that repeat exactly in every evaluation
        generator = None if self.training else torch.Generator().manual_seed(EVAL_SEED + _fingerprint(input_ids))
        noisy, masked, p = self.corrupt(input_ids, generator)
        aux = AuxLosses()
        logits = self(noisy, aux=aux)
        ce = F.cross_entropy(logits.float().flatten(0, 1), input_ids.flatten(), reduction="none").view_as(p.expand_as(masked))
        nelbo = (ce * masked / p).sum() / input_ids.numel()
        return Loss(nelbo + aux.total(), {"lm": nelbo, **aux.parts}, aux.metrics)

    # ----- the approximate prefix cache of parallel decoding -----
    @property
    def supports_prefix_cache(self) -> bool:
        return not self.config.reversible and all(b.supports_prefix_cache for b in self.blocks)

    def init_prefix_cache(self) -> list[PrefixCache]:
        if not self.supports_prefix_cache:
            from speedlm.errors import SpeedlmError

            raise SpeedlmError("the prefix cache needs pre-norm blocks whose mixers read a frozen prefix (full attention)")
        return [PrefixCache() for _ in self.blocks]

    # ----- what the trainer and benchmarks ask -----
    @property
    def data_dependent_flops(self) -> bool:
        """Its FLOPs per token follow values it learns (a training budget recounts them)."""
        return data_dependent_flops(self.blocks)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if non_embedding else n

    def num_active_params(self) -> int:
        return self.num_params()

    def flops_per_token(self, context_len: int, training: bool = True) -> float:
        fwd = sum(b.bidirectional_flops_per_token(context_len) for b in self.blocks) + 2.0 * self.config.d_model * self.config.vocab_size
        return 3.0 * fwd if training else fwd

    def state_bytes(self, context_len: int, batch_size: int = 1, bytes_per_elem: int = 2) -> int:
        return 0

    def max_context(self, kv_policy=None) -> int:
        return self.config.max_seq_len
