"""What a training step minimises, as one callable the trainer takes from outside.

An objective is `objective(model, x, y, **meta) -> Loss` (models/causal_lm.py `Loss`: the total
to minimise, its named parts, which the trainer logs as `loss/<name>`, and metrics). `meta` is
what the step passes beside the batch (segment mode's `cache`). The default is the model's own
loss; distillation (speedlm/distill/objectives.py) brings a teacher. The same callable serves
one process, DDP (inside the module DDP wraps, so gradients are averaged) and FSDP.

Optional, read by the trainer when present:
- `spec() -> dict`: a JSON-able description stored in every checkpoint; a resume must pass an
  objective with the same spec (the objective's teacher is not saved with the student);
- `flops_per_token(model, context_len) -> float`: the training FLOPs of one token under this
  objective (e.g. the teacher's forward on top of the student's), for throughput and MFU.
"""

from __future__ import annotations


def model_loss(model, x, y, **meta):
    """The default objective: the model's own loss (cross-entropy plus its auxiliary losses)."""
    return model.loss(x, y, **meta)


def objective_spec(objective) -> dict | None:
    """What a checkpoint records of `objective` (None: the model's own loss)."""
    if objective is model_loss:
        return None
    spec = getattr(objective, "spec", None)
    return spec() if spec is not None else {"name": getattr(objective, "__qualname__", type(objective).__qualname__)}


def training_flops_per_token(objective, model, context_len: int) -> float:
    """Training FLOPs per token under `objective`: its own count where it gives one, else the model's."""
    count = getattr(objective, "flops_per_token", None)
    if count is not None:
        return count(model, context_len)
    return model.flops_per_token(context_len, training=True)
