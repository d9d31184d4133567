"""Config schema, mixer registry, presets and model classes."""

from speedlm.models.build import build_model, resolve_config
from speedlm.models.causal_lm import CausalLM
from speedlm.models.config import ModelConfig
from speedlm.models.presets import PRESETS, SIZES, preset_config
from speedlm.models.registry import MIXERS, register_mixer

__all__ = [
    "CausalLM",
    "ModelConfig",
    "MIXERS",
    "PRESETS",
    "SIZES",
    "build_model",
    "preset_config",
    "register_mixer",
    "resolve_config",
]
