"""Import a Hugging Face Mixtral checkpoint (`MixtralForCausalLM`) into speedlm's `mixtral`
layout: the Llama-family attention (hf/llama.py's checks and names) with the `moe` FFN in every
layer: `num_local_experts` SwiGLU experts, top `num_experts_per_tok` by the router's softmax,
the chosen weights renormalised over the k (Mixtral's rule), dropless. transformers stacks the
experts (gate_up (E, 2H, D), down (E, D, H)); speedlm keeps (E, D, H) and (E, H, D) per matrix.
Router jitter is a training-time noise and is refused when set, so that imported training equals
the original's."""

from __future__ import annotations

from dataclasses import replace

import torch

from speedlm.errors import SpeedlmError
from speedlm.hf.llama import ATTENTION_MAP, transformer_model_config
from speedlm.models.config import ModelConfig

IMPORTABLE = ("mixtral",)


def mixtral_model_config(config) -> ModelConfig:
    """The speedlm `ModelConfig` of a Hugging Face `MixtralConfig`, or SpeedlmError naming what
    does not agree."""
    kind = getattr(config, "model_type", None)
    if kind not in IMPORTABLE:
        raise SpeedlmError(f"not a Mixtral model; this one is {kind!r}")
    if getattr(config, "router_jitter_noise", 0.0):
        raise SpeedlmError(f"router_jitter_noise={config.router_jitter_noise} has no speedlm counterpart")
    if config.num_experts_per_tok == 1:  # speedlm's top-1 is Switch's: the expert's output times its probability
        raise SpeedlmError("num_experts_per_tok=1: Mixtral renormalises the chosen weight to 1, speedlm's top-1 MoE "
                           "scales by the router probability (Switch)")
    moe = {"name": "moe", "experts": config.num_local_experts, "top_k": config.num_experts_per_tok}
    return replace(transformer_model_config(config), ffn=moe)


def mixtral_state_dict(hf_state: dict[str, torch.Tensor], n_layers: int, hidden: int, tied: bool) -> dict:
    """speedlm names for a `MixtralForCausalLM` state dict (float32)."""
    out = {"embed.weight": hf_state["model.embed_tokens.weight"], "norm.weight": hf_state["model.norm.weight"]}
    out["lm_head.weight"] = out["embed.weight"] if tied else hf_state["lm_head.weight"]
    for i in range(n_layers):
        src, dst = f"model.layers.{i}.", f"blocks.{i}."
        for a, b in ATTENTION_MAP.items():
            out[f"{dst}{b}.weight"] = hf_state[f"{src}{a}.weight"]
        out[dst + "ffn.router.weight"] = hf_state[src + "mlp.gate.weight"]
        gate_up = hf_state[src + "mlp.experts.gate_up_proj"]  # (E, 2H, D): gate rows, then up rows
        out[dst + "ffn.w_gate"] = gate_up[:, :hidden].transpose(1, 2)
        out[dst + "ffn.w_up"] = gate_up[:, hidden:].transpose(1, 2)
        out[dst + "ffn.w_down"] = hf_state[src + "mlp.experts.down_proj"].transpose(1, 2)
    return {k: v.detach().to(torch.float32).contiguous() for k, v in out.items()}


def from_mixtral(hf_model):
    """A speedlm `CausalLM` with the weights of a loaded Hugging Face `MixtralForCausalLM`."""
    from speedlm.hf.convert import build_with_weights

    config = mixtral_model_config(hf_model.config)
    return build_with_weights(config, mixtral_state_dict(hf_model.state_dict(), config.n_layers,
                                                         config.ffn_hidden, config.tie_embeddings))


__all__ = ["from_mixtral", "mixtral_model_config", "mixtral_state_dict"]
