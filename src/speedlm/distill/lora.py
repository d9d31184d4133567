"""LoRA adapters on the kept layers during distillation (`speedlm distill --train lora`; Hu et al.
2021, arXiv:2106.09685; LoLCATs trains its linearised layers' LoRA the same way).

Every linear weight W (out x in) of a kept block becomes W + (alpha / r) B A, with A (r x in)
random and B (out x r) zero, so the student starts exactly where it was; W itself is frozen,
and only A, B and the new mixers train. The adapter is a `torch.nn.utils.parametrize`
parametrization of the weight rather than `peft`'s LoRA layers: peft is not a dependency (it
would bring transformers and accelerate into the core), and its wrappers rename and replace the
model's modules, so speedlm's checkpoints (config -> model -> state dict) could no longer
rebuild or resume the student. A parametrization keeps every module where it is; the trainer
checkpoints and resumes the adapters like any parameters (keys `...parametrizations.weight.*`),
and at the end of the stage `merge_lora` folds B A into W, leaving a plain student of the
student's own config. The adapters' few FLOPs are not in the objective's count.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.utils import parametrize


class LoRA(nn.Module):
    """The parametrization W -> W + scale * B @ A."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float, generator: torch.Generator,
                 dtype=torch.float32, device=None):
        super().__init__()
        # A as nn.Linear's default init (kaiming-uniform, a = sqrt(5)): bound 1 / sqrt(in); B zero
        bound = 1.0 / math.sqrt(in_features)
        a = (torch.rand(rank, in_features, generator=generator, dtype=torch.float64) * 2 - 1) * bound
        self.A = nn.Parameter(a.to(dtype=dtype, device=device))
        self.B = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device))
        self.scale = alpha / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * (self.B @ self.A)


def kept_linears(model: nn.Module, new_layers) -> list[tuple[str, nn.Linear]]:
    """(name, module) of every nn.Linear inside the blocks not in `new_layers`."""
    new = set(new_layers)
    return [(f"blocks.{i}.{name}", m) for i, block in enumerate(model.blocks) if i not in new
            for name, m in block.named_modules() if isinstance(m, nn.Linear)]


def add_lora(model: nn.Module, new_layers, rank: int, alpha: float, seed: int = 0) -> list[str]:
    """Adapters on the kept blocks' linear weights (their base weights frozen); their names."""
    g = torch.Generator().manual_seed(seed)
    names = []
    for name, linear in kept_linears(model, new_layers):
        w = linear.weight
        w.requires_grad_(False)
        parametrize.register_parametrization(
            linear, "weight", LoRA(w.shape[0], w.shape[1], rank, alpha, g, w.dtype, w.device))
        names.append(name)
    return names


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its weight (W + scale B A) and drop the parametrization; the
    count merged. The merged weights keep requires_grad as the caller's freezing left them."""
    merged = 0
    for m in model.modules():
        if parametrize.is_parametrized(m, "weight") and any(isinstance(p, LoRA) for p in m.parametrizations.weight):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
            merged += 1
    return merged


@contextmanager
def lora_adapters(model: nn.Module, new_layers, rank: int, alpha: float, seed: int = 0):
    """Adapters on the kept layers for the body of the `with`, merged into the weights after it
    (also when it raises: the in-memory student stays a plain model)."""
    names = add_lora(model, new_layers, rank, alpha, seed)
    try:
        yield names
    finally:
        merge_lora(model)
