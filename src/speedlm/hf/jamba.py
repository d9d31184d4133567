"""Import a Hugging Face Jamba checkpoint (`JambaForCausalLM`) into speedlm's `jamba` layout.

Jamba's layer i is attention when i % attn_layer_period == attn_layer_offset (GQA, no positional
encoding: speedlm's attention with `positions: "none"`) and Mamba otherwise (RMS norms with gains
on dt, B and C: `inner_norms`, at the model's rms_norm_eps); its FFN is a Mixture-of-Experts when
i % expert_layer_period == expert_layer_offset and num_experts > 1, a dense SwiGLU otherwise. Every
layer is pre-norm (input_layernorm before the mixer, pre_ff_layernorm before the FFN).

The MoE keeps the top num_experts_per_tok softmax probabilities as they are (`renormalize=False`),
for top-1 too: Jamba's router is then Switch's, which is what speedlm's top-1 computes. The layers
become a pattern of four letters (M: Mamba + SwiGLU, E: Mamba + MoE, A: attention + SwiGLU,
X: attention + MoE) at its shortest period that tiles the depth. Where transformers' model and
speedlm's disagree (projection biases in the Mamba mixer, another activation, a sliding window, a
head size other than width / heads) the import refuses with the field's name. A Mamba mixer
without conv bias (mamba_conv_bias=False) loads zeros into speedlm's conv bias.

Aux losses are not carried over (as for Mixtral): speedlm's `moe` keeps its own balance and z-loss
coefficients; Jamba adds its balance loss only with output_router_logits.
"""

from __future__ import annotations

import torch

from speedlm.errors import SpeedlmError
from speedlm.hf.mamba import mixer_state_dict
from speedlm.hf.qwen_moe import shortest_tiling
from speedlm.models.config import ModelConfig

IMPORTABLE = ("jamba",)


def _layer_letters(config) -> str:
    """One letter per layer: the mixer (attention or Mamba) and the FFN (experts or dense)."""
    letter = {(False, False): "M", (False, True): "E", (True, False): "A", (True, True): "X"}
    letters = []
    for i in range(config.num_hidden_layers):
        attention = i % config.attn_layer_period == config.attn_layer_offset
        experts = config.num_experts > 1 and i % config.expert_layer_period == config.expert_layer_offset
        letters.append(letter[attention, experts])
    return "".join(letters)


def jamba_model_config(config) -> ModelConfig:
    """The speedlm `ModelConfig` of a Hugging Face `JambaConfig`, or SpeedlmError naming what does
    not agree."""
    kind = getattr(config, "model_type", None)
    if kind not in IMPORTABLE:
        raise SpeedlmError(f"not a Jamba model; this one is {kind!r}")
    heads, width = config.num_attention_heads, config.hidden_size
    disagree = []
    if config.hidden_act != "silu":
        disagree.append(f"activation {config.hidden_act!r} (speedlm's Mamba and SwiGLU use silu)")
    if config.mamba_proj_bias:
        disagree.append("biases in the Mamba input and output projections (mamba_proj_bias=True)")
    if getattr(config, "sliding_window", None) is not None:  # older Jamba configs carry it (flash-attention's window)
        disagree.append(f"a sliding window of {config.sliding_window} (sliding_window)")
    head_dim = getattr(config, "head_dim", None) or width // heads
    if head_dim * heads != width:
        disagree.append(f"head_dim={head_dim} with {heads} heads of width {width} (speedlm: width / heads)")
    if disagree:
        raise SpeedlmError("this model's architecture differs from speedlm's jamba: " + "; ".join(disagree))
    kv = config.num_key_value_heads or heads
    attention = {"name": "attention", "positions": "none", **({"kv_heads": kv} if kv != heads else {})}
    mamba = {"name": "mamba", "d_state": config.mamba_d_state, "expand": config.mamba_expand,
             "conv_kernel": config.mamba_d_conv, "dt_rank": config.mamba_dt_rank, "inner_norms": True}
    moe = {"name": "moe", "experts": config.num_experts, "top_k": config.num_experts_per_tok, "renormalize": False}
    specs = {"M": {"mixer": mamba}, "E": {"mixer": mamba, "ffn": moe},
             "A": {"mixer": attention}, "X": {"mixer": attention, "ffn": moe}}
    pattern = shortest_tiling(_layer_letters(config))  # speedlm tiles its pattern over the depth
    return ModelConfig(
        vocab_size=config.vocab_size,
        d_model=width,
        n_layers=config.num_hidden_layers,
        n_heads=heads,
        pattern=pattern,
        layers={letter: specs[letter] for letter in sorted(set(pattern))},
        ffn_hidden=config.intermediate_size,
        max_seq_len=config.max_position_embeddings,
        tie_embeddings=bool(config.tie_word_embeddings),
        norm_eps=float(config.rms_norm_eps),
        init_std=float(config.initializer_range),
    )


def _experts(hf_state: dict, src: str, dst: str, hidden: int) -> dict:
    """transformers' stacked experts (gate_up (E, 2H, D): gate rows then up rows; down (E, D, H))
    as speedlm's per-matrix ones (w_gate, w_up (E, D, H), w_down (E, H, D))."""
    gate_up = hf_state[src + "experts.gate_up_proj"]
    return {dst + "router.weight": hf_state[src + "router.weight"],
            dst + "w_gate": gate_up[:, :hidden].transpose(1, 2), dst + "w_up": gate_up[:, hidden:].transpose(1, 2),
            dst + "w_down": hf_state[src + "experts.down_proj"].transpose(1, 2)}


def jamba_state_dict(hf_state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """speedlm names for a `JambaForCausalLM` state dict (float32), laid out as `config`."""
    out = {"embed.weight": hf_state["model.embed_tokens.weight"],
           "norm.weight": hf_state["model.final_layernorm.weight"]}
    out["lm_head.weight"] = out["embed.weight"] if config.tie_embeddings else hf_state["lm_head.weight"]
    for i, spec in enumerate(config.layer_specs()):
        src, dst = f"model.layers.{i}.", f"blocks.{i}."
        out[dst + "mixer_norm.weight"] = hf_state[src + "input_layernorm.weight"]
        out[dst + "ffn_norm.weight"] = hf_state[src + "pre_ff_layernorm.weight"]
        if spec["mixer"]["name"] == "attention":
            out.update({f"{dst}mixer.{p}_proj.weight": hf_state[f"{src}self_attn.{p}_proj.weight"] for p in "qkvo"})
        else:
            out.update(mixer_state_dict(hf_state, src + "mamba.", dst + "mixer."))
        if spec["ffn"]["name"] == "moe":
            out.update(_experts(hf_state, src + "feed_forward.", dst + "ffn.", config.hidden_dim))
        else:
            out.update({f"{dst}ffn.{p}.weight": hf_state[f"{src}feed_forward.{p}_proj.weight"]
                        for p in ("gate", "up", "down")})
    return {k: v.detach().to(torch.float32).contiguous() for k, v in out.items()}


def from_jamba(hf_model):
    """A speedlm `CausalLM` with the weights of a loaded Hugging Face `JambaForCausalLM`."""
    from speedlm.hf.convert import build_with_weights

    config = jamba_model_config(hf_model.config)
    return build_with_weights(config, jamba_state_dict(hf_model.state_dict(), config))


__all__ = ["from_jamba", "jamba_model_config", "jamba_state_dict"]
