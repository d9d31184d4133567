"""`speedlm compare`: architectures at equal training compute, side by side (see run.py)."""

from speedlm.compare.plan import ModelPlan, match_width, plan_model, steps_for_budget
from speedlm.compare.run import (
    DEFAULT_BUDGET,
    DEFAULT_CONTEXTS,
    DEFAULT_MQAR,
    DEFAULT_PRESETS,
    TIMING_FIELDS,
    CompareOptions,
    run_compare,
)

__all__ = [
    "CompareOptions",
    "DEFAULT_BUDGET",
    "DEFAULT_CONTEXTS",
    "DEFAULT_MQAR",
    "DEFAULT_PRESETS",
    "ModelPlan",
    "TIMING_FIELDS",
    "match_width",
    "plan_model",
    "run_compare",
    "steps_for_budget",
]
