"""Learning-rate schedule: linear warmup, then cosine decay to `min_lr_ratio * lr`.

A pure function of the step, so a resumed run recomputes exactly the rate it would have
used without the interruption; nothing about the schedule needs to be checkpointed beyond
its parameters.
"""

from __future__ import annotations

import math

from speedlm.errors import SpeedlmError


def lr_at(step: int, total_steps: int, lr: float, warmup_steps: int, min_lr_ratio: float) -> float:
    """Learning rate for optimizer step `step` (0-based) of a `total_steps` run.

    * Warmup, `step < warmup_steps`: `lr * (step + 1) / warmup_steps`. Step 0 gets a small
      non-zero rate (a zero-rate first step would be wasted compute); the last warmup step
      reaches `lr`.
    * Decay, `warmup_steps <= step <= total_steps - 1`: cosine from `lr` (at `warmup_steps`)
      down to `min_lr_ratio * lr`, reached exactly on the final step `total_steps - 1`.
    * Past the end (a run extended on resume) it stays at `min_lr_ratio * lr`.
    """
    if total_steps <= 0 or warmup_steps < 0 or step < 0:
        raise SpeedlmError(
            f"invalid schedule: step={step}, total_steps={total_steps}, warmup_steps={warmup_steps}; "
            "use step >= 0, total_steps > 0 and warmup_steps >= 0"
        )
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise SpeedlmError(f"invalid schedule: min_lr_ratio={min_lr_ratio} must be between 0 and 1")
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    min_lr = min_lr_ratio * lr
    decay_steps = total_steps - 1 - warmup_steps
    if decay_steps <= 0:  # no room to decay: warmup ends on (or after) the last step
        return lr if step < total_steps else min_lr
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
