"""`build_model(preset name | ModelConfig | dict | path to config JSON)`."""

from __future__ import annotations

import os

from speedlm.errors import SpeedlmError
from speedlm.models.causal_lm import CausalLM
from speedlm.models.config import ModelConfig
from speedlm.models.presets import preset_config


def resolve_config(spec, **overrides) -> ModelConfig:
    if isinstance(spec, ModelConfig):
        cfg = ModelConfig.from_dict({**spec.to_dict(), **overrides})
    elif isinstance(spec, dict):
        cfg = ModelConfig.from_dict({**spec, **overrides})
    elif isinstance(spec, str) and spec.endswith(".json"):
        if not os.path.isfile(spec):
            raise SpeedlmError(f"config file {spec!r} does not exist")
        with open(spec) as f:
            cfg = ModelConfig.from_json(f.read())
        cfg = ModelConfig.from_dict({**cfg.to_dict(), **overrides})
    elif isinstance(spec, str):
        cfg = preset_config(spec, **overrides)
    else:
        raise SpeedlmError(f"cannot build a model from {type(spec).__name__}; give a preset name, config or JSON path")
    return cfg


def build_model(spec, **overrides) -> CausalLM:
    cfg = resolve_config(spec, **overrides)
    if cfg.objective != "ar":
        raise SpeedlmError(f"objective {cfg.objective!r} has no model class yet")
    return CausalLM(cfg)
