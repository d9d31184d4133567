"""Work a module does between optimizer steps, never inside a forward pass.

Some parts change themselves on a training schedule (Performer redraws its random features).
Done inside `forward`, that work would run again wherever a forward is recomputed (activation
checkpointing, reversible layers) and could change the function between the forward and its
backward. A module that needs it subclasses `AfterOptimizerStep`; the trainer calls
`after_optimizer_step(model, step)` once after every optimizer step, so the forward stays a
pure function of the weights and buffers."""

from __future__ import annotations

from torch import nn


class AfterOptimizerStep:
    """Mixin for modules with work to do once after each optimizer step."""

    def after_optimizer_step(self, step: int) -> None:
        """`step`: the number of optimizer steps completed so far (1 after the first)."""
        raise NotImplementedError


def after_optimizer_step(model: nn.Module, step: int) -> None:
    """Run every module's post-step work (in module order, so seeded runs repeat)."""
    for m in model.modules():
        if isinstance(m, AfterOptimizerStep):
            m.after_optimizer_step(step)
