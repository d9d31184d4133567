"""Fair compute: comparable parameter counts, then the same training FLOPs for every model.

Widths. The first model keeps its preset's width; every other model gets the width (d_model,
in steps that keep its heads even-sized, within 1/4x..4x of its preset's width, the FFN
following the width) whose active non-embedding parameter count is closest to the first
model's. Active: the parameters a token passes through, so a Mixture-of-Experts model is
matched on its router and top-k experts (like its FLOPs), not on every expert; for dense models
active and total are the same. With
`match="none"` every preset keeps its width. Non-embedding parameters, because the embedding
table is a lookup that costs no FLOPs per token and would let a wider model hide parameters.

Steps. Each model trains for `floor(budget / (flops_per_token * tokens_per_step))` steps, with
`flops_per_token` its own analytic training cost at the training length (so a cheaper model
takes more steps), on the same batch shape, data order, seed and schedule shape (warmup as a
fraction of its steps, then cosine).

A checkpoint folder (compare/pretrained.py) is planned apart (`plan_pretrained`): it keeps its
saved width, is never the width target, and takes 0 steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from speedlm.errors import SpeedlmError
from speedlm.models import ModelConfig, build_model

MATCH_MODES = ("first", "none")


class BudgetTooSmall(SpeedlmError):
    """The budget does not pay for one step of some model: a bad argument, not a model failure."""


@dataclass
class ModelPlan:
    name: str  # the preset (or config path) as the user gave it
    config: ModelConfig  # width-matched, vocabulary set
    preset_width: int
    params: int
    params_non_embedding: int
    params_active_non_embedding: int  # what width matching compares (routed parts: what a token uses)
    flops_per_token: float  # training FLOPs per token at the training length
    steps: int
    tokens: int
    train_flops: float  # what the steps cost at the planned FLOPs per token (<= the budget, within one step)
    # the FLOP budget training spends (None: a time budget fixed the steps)
    train_flops_budget: float | None = None
    # a checkpoint folder measured as saved: never resized, never trained (compare/pretrained.py)
    pretrained: bool = False

    @property
    def width(self) -> int:
        return self.config.d_model

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "config": self.config.to_dict(),
            "d_model": self.width,
            "preset_d_model": self.preset_width,
            "params": self.params,
            "params_non_embedding": self.params_non_embedding,
            "params_active_non_embedding": self.params_active_non_embedding,
            "params_active": self.params - (self.params_non_embedding - self.params_active_non_embedding),
            "train_flops_per_token": self.flops_per_token,
            "steps": self.steps,
            "tokens": self.tokens,
            "train_flops": self.train_flops,
            "planned_steps": self.steps,
            "planned_flops_per_token": self.flops_per_token,
            **({"pretrained": True} if self.pretrained else {}),
        }


def count_params(cfg: ModelConfig) -> tuple[int, int, int]:
    """(total, non-embedding, active non-embedding) parameters of `cfg`, built on the meta
    device (no memory, no init)."""
    with torch.device("meta"):
        model = build_model(cfg)
    non_embedding = model.num_params(non_embedding=True)
    return model.num_params(), non_embedding, non_embedding - (model.num_params() - model.num_active_params())


def _with_width(cfg: ModelConfig, width: int) -> ModelConfig | None:
    fields = cfg.to_dict()
    fields["d_model"] = width
    try:
        return ModelConfig.from_dict(fields)
    except SpeedlmError:  # a width some part's options do not allow (kv_heads, head sizes, ...)
        return None


def match_width(cfg: ModelConfig, target_non_embedding: int) -> ModelConfig:
    """The width of `cfg`'s architecture whose active non-embedding parameters are closest to
    the target (log distance), searched in steps of 2 x n_heads within [d/4, 4d] (a budget
    ladder sizes the first model from a quarter to four times its preset)."""
    step = 2 * cfg.n_heads
    d0 = cfg.d_model
    best, best_gap = cfg, abs(math.log(count_params(cfg)[2] / target_non_embedding))
    for width in range(max(step, (d0 // 4) // step * step), 4 * d0 + 1, step):
        candidate = _with_width(cfg, width) if width != d0 else None
        if candidate is None:
            continue
        gap = abs(math.log(count_params(candidate)[2] / target_non_embedding))
        if gap < best_gap - 1e-12:
            best, best_gap = candidate, gap
    return best


def width_for_tokens_per_param(cfg: ModelConfig, budget: float, tokens_per_param: float, seq_len: int) -> ModelConfig:
    """The width of `cfg`'s architecture whose training tokens under `budget` per active
    non-embedding parameter come closest to `tokens_per_param` (log distance), in steps of
    2 x n_heads from one step up to 4x the preset's width: a compute-efficient size for that
    budget by a fixed ratio (Hoffmann et al. 2022 find about 20 tokens per parameter; the
    ladder's first model follows it and the others are matched to it)."""
    step = 2 * cfg.n_heads
    best, best_gap = cfg, math.inf
    for width in range(step, 4 * cfg.d_model + 1, step):
        candidate = _with_width(cfg, width) if width != cfg.d_model else cfg
        if candidate is None:
            continue
        active = count_params(candidate)[2]
        with torch.device("meta"):
            fpt = build_model(candidate).flops_per_token(seq_len, training=True)
        gap = abs(math.log(budget / fpt / active / tokens_per_param))
        if gap < best_gap - 1e-12:
            best, best_gap = candidate, gap
    return best


def steps_for_budget(budget: float, flops_per_token: float, tokens_per_step: int) -> int:
    """Whole optimizer steps that fit in `budget` training FLOPs."""
    return int(budget // (flops_per_token * tokens_per_step))


def plan_model(name: str, cfg: ModelConfig, budget: float | None, batch_size: int, seq_len: int,
               target: int | None, preset_width: int | None = None) -> ModelPlan:
    """Width and steps of one model. `budget` None: only the width and cost (a time budget sets
    the steps by calibration). `preset_width`: the preset's width where `cfg` was resized before."""
    preset_width = preset_width or cfg.d_model
    if target is not None:
        cfg = match_width(cfg, target)
    params, non_emb, active = count_params(cfg)
    with torch.device("meta"):
        fpt = build_model(cfg).flops_per_token(seq_len, training=True)
    tokens_per_step = batch_size * seq_len
    steps = 0 if budget is None else steps_for_budget(budget, fpt, tokens_per_step)
    if budget is not None and steps < 1:
        raise BudgetTooSmall(
            f"budget {budget:.3g} FLOPs is too small for one training step of {name} "
            f"({fpt * tokens_per_step:.3g} FLOPs per step of {batch_size} x {seq_len} tokens); raise --budget"
        )
    return ModelPlan(name, cfg, preset_width, params, non_emb, active, fpt, steps, steps * tokens_per_step,
                     steps * tokens_per_step * fpt, budget)


def plan_pretrained(name: str, cfg: ModelConfig, seq_len: int) -> ModelPlan:
    """The plan of a checkpoint measured as saved: its own width, 0 steps, 0 training FLOPs
    (`flops_per_token`: what a token of training would cost it, analytic)."""
    params, non_emb, active = count_params(cfg)
    with torch.device("meta"):
        fpt = build_model(cfg).flops_per_token(seq_len, training=True)
    return ModelPlan(name, cfg, cfg.d_model, params, non_emb, active, fpt, 0, 0, 0.0, None, pretrained=True)


def check_match(match: str) -> str:
    if match not in MATCH_MODES:
        raise SpeedlmError(f"--match-params must be one of {MATCH_MODES}, got {match!r}")
    return match
