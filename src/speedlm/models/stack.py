"""What every model class (CausalLM, Encoder, DiffusionLM) does with its layer stack: build the
blocks from the config's layer specs, scale their residual projections, re-initialise
children first, and run the blocks (plainly or as a reversible stack)."""

from __future__ import annotations

import math

import torch
from torch import nn

from speedlm.layers.context import SeqMeta
from speedlm.models.reversible import reversible_forward
from speedlm.registry import BLOCKS


def build_blocks(config) -> nn.ModuleList:
    return nn.ModuleList(
        BLOCKS.build(spec["block"], config.dims(i), mixer=spec["mixer"], ffn=spec["ffn"])
        for i, spec in enumerate(config.layer_specs())
    )


def scale_residuals(blocks, n_layers: int) -> None:
    """Every projection that writes into the residual stream scaled by 1/sqrt(2 n_layers)
    (GPT-2), so the stream's variance does not grow with depth."""
    scale = 1.0 / math.sqrt(2 * n_layers)
    with torch.no_grad():
        for block in blocks:
            for w in block.residual_weights():
                w.mul_(scale)


def reset_children(model: nn.Module) -> None:
    """Every submodule's own `reset_parameters`, children before parents, so that a mixer's
    initialisation of its projections wins over nn.Linear's default."""
    for m in reversed(list(model.modules())):
        if m is not model and hasattr(m, "reset_parameters"):
            m.reset_parameters()


def data_dependent_flops(blocks) -> bool:
    """Whether some block's FLOPs follow values it learns (adaptive span): budgets recount them."""
    return any(b.data_dependent_flops for b in blocks)


def run_blocks(blocks, x: torch.Tensor, meta: SeqMeta, caches=None, reversible: bool = False) -> torch.Tensor:
    """x through every block (with its cache, if any): the residual stream, or the two-stream
    reversible stack (models/reversible.py)."""
    if reversible:
        return reversible_forward(blocks, x, meta, caches)
    for i, block in enumerate(blocks):
        x = block(x, meta, None if caches is None else caches[i])
    return x
