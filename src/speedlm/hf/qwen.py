"""Import Hugging Face Qwen2 (`Qwen2ForCausalLM`) and Qwen3 (`Qwen3ForCausalLM`) checkpoints into
speedlm's transformer: the Llama layer (hf/llama.py's checks) with the options of speedlm's
`attention` that these families add, weight for weight:

- Qwen2: biases on q_proj, k_proj and v_proj (not o_proj) -> `qkv_bias`;
- Qwen3: an RMSNorm with a gain over each query and key head before RoPE -> `qk_norm`, and an
  explicit head_dim (Qwen3-0.6B: width 1024, 16 heads of 128) -> `head_dim`.

Both configs carry Qwen2's sliding-window fields (`use_sliding_window`, `sliding_window`,
`max_window_layers`, `layer_types`); released checkpoints keep them off, and a config that turns
them on is refused rather than approximated.
"""

from __future__ import annotations

import re

import torch

from speedlm.errors import SpeedlmError
from speedlm.hf.llama import ATTENTION_MAP, transformer_model_config
from speedlm.models.config import ModelConfig

IMPORTABLE = ("qwen2", "qwen3")
_OPTIONS = {"qwen2": {"qkv_bias": True}, "qwen3": {"qk_norm": True}}

# transformers' module names in a layer -> speedlm's; each keeps its parameter name (weight, bias)
_LAYER_MAP = {
    **ATTENTION_MAP,
    "self_attn.q_norm": "mixer.q_norm",
    "self_attn.k_norm": "mixer.k_norm",
    "mlp.gate_proj": "ffn.gate",
    "mlp.up_proj": "ffn.up",
    "mlp.down_proj": "ffn.down",
}
_LAYER_PARAM = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")


def qwen_model_config(config) -> ModelConfig:
    """The speedlm `ModelConfig` of a Hugging Face `Qwen2Config` or `Qwen3Config`, or SpeedlmError
    naming what does not agree."""
    kind = getattr(config, "model_type", None)
    if kind not in IMPORTABLE:
        raise SpeedlmError(f"not a Qwen2 or Qwen3 model; this one is {kind!r}")
    if getattr(config, "use_sliding_window", False):
        raise SpeedlmError(
            f"use_sliding_window=True (a window of {config.sliding_window} from layer {config.max_window_layers} on) "
            "is not imported; only full-attention Qwen models import"
        )
    kinds = sorted(set(getattr(config, "layer_types", None) or ["full_attention"]))
    if kinds != ["full_attention"]:
        raise SpeedlmError(f"layer_types {kinds}: only full_attention layers import")
    return transformer_model_config(config, **_OPTIONS[kind])


def qwen_state_dict(hf_state: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """speedlm names for a Qwen2 / Qwen3 state dict (float32): every layer tensor by its module
    (an unknown module is a KeyError: a mapping bug, never a silent drop)."""
    out = {"embed.weight": hf_state["model.embed_tokens.weight"], "norm.weight": hf_state["model.norm.weight"]}
    out["lm_head.weight"] = out["embed.weight"] if tied else hf_state["lm_head.weight"]
    for name, tensor in hf_state.items():
        m = _LAYER_PARAM.fullmatch(name)
        if m is not None:
            out[f"blocks.{m[1]}.{_LAYER_MAP[m[2]]}.{m[3]}"] = tensor
    return {k: v.detach().to(torch.float32) for k, v in out.items()}


def from_qwen(hf_model):
    """A speedlm `CausalLM` with the weights of a loaded Hugging Face Qwen2 or Qwen3 causal LM."""
    from speedlm.hf.convert import build_with_weights

    config = qwen_model_config(hf_model.config)
    return build_with_weights(config, qwen_state_dict(hf_model.state_dict(), config.tie_embeddings))


__all__ = ["from_qwen", "qwen_model_config", "qwen_state_dict"]
