"""Config schema, part registries, presets and model classes."""

from speedlm.models.build import build_model, resolve_config
from speedlm.models.causal_lm import CausalLM, Loss
from speedlm.models.config import ModelConfig
from speedlm.models.presets import PRESETS, SIZES, preset_config
from speedlm.models.registry import BLOCKS, FFNS, MIXERS, register_block, register_ffn, register_mixer

__all__ = [
    "BLOCKS",
    "CausalLM",
    "FFNS",
    "Loss",
    "MIXERS",
    "ModelConfig",
    "PRESETS",
    "SIZES",
    "build_model",
    "preset_config",
    "register_block",
    "register_ffn",
    "register_mixer",
    "resolve_config",
]
