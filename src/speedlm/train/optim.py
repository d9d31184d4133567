"""AdamW with weight decay on weight matrices only.

Decay pulls parameters towards zero. That regularises matrices (projections, embeddings),
but on 1-D parameters (RMSNorm gains, biases) it just fights the scale the model needs, so
they go into a group with weight_decay=0. The rule is by dimension, not by name, so any new
layer type is covered without edits here.
"""

from __future__ import annotations

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices (dim >= 2) with `weight_decay`, everything else without.

    `named_parameters()` yields a tied parameter (embedding = LM head) once, so it is never
    updated twice per step.
    """
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW over `param_groups(model, weight_decay)`.

    fused/foreach are left unset so torch picks its fastest implementation for the device
    the parameters live on; move the model to its device before calling this.
    """
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps)
