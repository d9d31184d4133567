"""`build_model(preset name | ModelConfig | dict | path to config JSON | checkpoint folder)`."""

from __future__ import annotations

import os

from speedlm.errors import SpeedlmError
from speedlm.models.causal_lm import CausalLM
from speedlm.registry import MODELS
from speedlm.models.config import ModelConfig
from speedlm.models.presets import preset_config


def is_checkpoint(spec) -> bool:
    """Whether a model spec names a checkpoint (a run or step folder) rather than a preset or a
    config: benchmarks and compare then measure its weights (an imported or trained model), via
    speedlm.checkpoint.pretrained.spec_config / build_spec (checkpoints sit above models)."""
    if not isinstance(spec, (str, os.PathLike)) or not os.path.isdir(spec):
        return False
    try:  # a preset name stays a preset, even beside a folder of that name
        preset_config(str(spec))
    except SpeedlmError:
        return True
    return False


def resolve_config(spec, **overrides) -> ModelConfig:
    """A validated ModelConfig from a preset name, a config, a dict or the path of a config JSON;
    `overrides` replace fields (e.g. vocab_size=...)."""
    if is_checkpoint(spec):
        raise SpeedlmError(f"{spec} is a folder: load a checkpoint with speedlm.checkpoint.pretrained.spec_config")
    if isinstance(spec, str) and not spec.endswith(".json"):
        return preset_config(spec, **overrides)
    if isinstance(spec, ModelConfig):
        if not overrides:
            return spec
        fields = spec.to_dict()
    elif isinstance(spec, dict):
        fields = spec
    elif isinstance(spec, str):
        if not os.path.isfile(spec):
            raise SpeedlmError(f"config file {spec!r} does not exist")
        with open(spec) as f:
            fields = ModelConfig.parse_json(f.read())
    else:
        raise SpeedlmError(f"cannot build a model from {type(spec).__name__}; give a preset name, config or JSON path")
    return ModelConfig.from_dict({**fields, **overrides})


def build_model(spec, **overrides) -> CausalLM:
    """A freshly initialised model of the class its config's objective calls for."""
    cfg = resolve_config(spec, **overrides)
    return MODELS[cfg.objective].cls(cfg)


def require_language_model(cfg: ModelConfig, name, diffusion: bool = False) -> None:
    """`train`, `compare` and the LM benchmarks train language models (next-token ones; also
    diffusion LMs where `diffusion`); encoders have their own command."""
    if cfg.objective == "diffusion" and not diffusion:
        raise SpeedlmError(f"{name} is a diffusion LM (objective 'diffusion'): it has no next-token cache for this command")
    if cfg.objective not in ("ar", "diffusion"):
        raise SpeedlmError(f"{name} is an encoder (objective {cfg.objective!r}), not a language model; "
                           "train it on a task with `speedlm train-classifier --task digits --presets ...`")

