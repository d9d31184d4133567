"""Config schema, part registries, presets and model classes."""

from speedlm.models.build import build_model, resolve_config
from speedlm.models.causal_lm import CausalLM, Loss
from speedlm.models.config import ModelConfig
from speedlm.models.presets import PRESETS, SIZES, preset_config, presets_for
from speedlm.models.registry import BLOCKS, FFNS, MIXERS, MODELS, register_block, register_ffn, register_mixer, register_model

__all__ = [
    "BLOCKS",
    "CausalLM",
    "FFNS",
    "Loss",
    "MIXERS",
    "MODELS",
    "ModelConfig",
    "PRESETS",
    "SIZES",
    "build_model",
    "preset_config",
    "presets_for",
    "register_block",
    "register_ffn",
    "register_mixer",
    "register_model",
    "resolve_config",
]
