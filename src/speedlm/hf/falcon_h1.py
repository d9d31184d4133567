"""Import a Hugging Face Falcon-H1 checkpoint (`FalconH1ForCausalLM`) onto speedlm's
`parallel_hybrid` mixer: every layer an RMSNorm, attention and Mamba-2 on the same normed input
with their outputs summed, a residual, then an RMSNorm, a SwiGLU FFN and a residual.

Falcon-H1 trains with muP multipliers that transformers applies in the forward pass. Each one
scales a linear map's input or output, so the import folds it into that map's weights (exact up
to one rounding of the product):

    embedding_multiplier        the embedding rows               (embed)
    attention_in_multiplier     q, k and v                       (their input)
    key_multiplier              k                                (before RoPE, which is linear)
    attention_out_multiplier    o                                (the attention branch's output)
    ssm_in_multiplier           the Mamba in_proj                (its input)
    ssm_multipliers [z,x,B,C,dt] the in_proj rows of each segment (its output, before the conv)
    ssm_out_multiplier          the Mamba out_proj
    mlp_multipliers [gate, down] the FFN's gate rows (before silu) and down
    lm_head_multiplier          the head; with tied embeddings (the head is the embedding, which
                                already carries embedding_multiplier) the final norm's gain takes
                                lm_head_multiplier / embedding_multiplier instead

so the speedlm model computes the plain layer. Refused, by field: biases (attention_bias puts
one on o as well, which speedlm's attention has not; mlp_bias; mamba_proj_bias on in_proj;
projectors_bias on out_proj), another activation, a clamp on dt (time_step_limit), scaled RoPE,
and embedding_multiplier = 0 with tied embeddings (nothing left to fold the head's scale into).
The Mamba-2 branch's options follow the config: mamba_d_ssm (or mamba_expand x width), heads of
mamba_d_head, mamba_n_groups, mamba_d_state, mamba_d_conv, mamba_chunk_size, mamba_conv_bias, and
the gated RMSNorm after the gate, before it (mamba_norm_before_gate) or none (mamba_rms_norm off).
"""

from __future__ import annotations

import torch

from speedlm.errors import SpeedlmError
from speedlm.hf.llama import _rope_theta
from speedlm.models.config import ModelConfig

IMPORTABLE = ("falcon_h1",)
_BIASES = {
    "attention_bias": "biases on q, k, v and o (speedlm's attention has none on o)",
    "mlp_bias": "biases in the MLP",
    "mamba_proj_bias": "a bias on the Mamba in_proj",
    "projectors_bias": "a bias on the Mamba out_proj",
}


def _ssm_inner(config) -> int:
    return config.mamba_d_ssm if config.mamba_d_ssm is not None else int(config.mamba_expand * config.hidden_size)


def _attention_head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def falcon_h1_model_config(config) -> ModelConfig:
    """The speedlm `ModelConfig` of a Hugging Face `FalconH1Config`, or SpeedlmError naming what
    does not agree."""
    kind = getattr(config, "model_type", None)
    if kind not in IMPORTABLE:
        raise SpeedlmError(f"not a Falcon-H1 model; this one is {kind!r}")
    disagree = [f"{field}=True ({what})" for field, what in _BIASES.items() if getattr(config, field, False)]
    if config.hidden_act != "silu":
        disagree.append(f"hidden_act={config.hidden_act!r} (speedlm's SwiGLU and Mamba-2 use silu)")
    limit = tuple(config.time_step_limit) if config.time_step_limit is not None else (0.0, float("inf"))
    if limit != (0.0, float("inf")):
        disagree.append(f"time_step_limit={limit} (speedlm's Mamba-2 does not clamp dt)")
    if config.tie_word_embeddings and config.embedding_multiplier == 0:
        disagree.append("embedding_multiplier=0 with tied embeddings (the head's scale cannot be folded)")
    if disagree:
        raise SpeedlmError("this model's architecture differs from speedlm's Falcon-H1 layout: " + "; ".join(disagree))
    heads, width = config.num_attention_heads, config.hidden_size
    mixer = {"name": "parallel_hybrid"}
    kv = config.num_key_value_heads or heads
    if kv != heads:
        mixer["kv_heads"] = kv
    if _attention_head_dim(config) * heads != width:
        mixer["head_dim"] = _attention_head_dim(config)
    norm = "none" if not config.mamba_rms_norm else "before_gate" if config.mamba_norm_before_gate else "after_gate"
    mixer.update(d_state=config.mamba_d_state, d_inner=_ssm_inner(config), ssm_head_dim=config.mamba_d_head,
                 n_groups=config.mamba_n_groups, conv_kernel=config.mamba_d_conv, chunk_size=config.mamba_chunk_size,
                 norm=norm, conv_bias=bool(config.mamba_conv_bias))
    return ModelConfig(
        vocab_size=config.vocab_size,
        d_model=width,
        n_layers=config.num_hidden_layers,
        n_heads=heads,
        pattern="F",
        layers={"F": {"mixer": mixer}},
        ffn_hidden=config.intermediate_size,
        max_seq_len=config.max_position_embeddings,
        tie_embeddings=bool(config.tie_word_embeddings),
        rope_theta=_rope_theta(config),
        norm_eps=float(config.rms_norm_eps),
        init_std=float(getattr(config, "initializer_range", 0.02)),
    )


def _in_proj_scale(config) -> torch.Tensor:
    """Per row of the Mamba in_proj (z | x | B | C | dt): ssm_in_multiplier times the segment's
    entry of ssm_multipliers (transformers' `mup_vector`)."""
    inner, bc = _ssm_inner(config), config.mamba_n_groups * config.mamba_d_state
    sizes = [inner, inner, bc, bc, config.mamba_n_heads]
    per_row = torch.cat([torch.full((n,), float(m), dtype=torch.float64) for n, m in zip(sizes, config.ssm_multipliers)])
    return per_row * float(config.ssm_in_multiplier)


def falcon_h1_state_dict(hf_state: dict[str, torch.Tensor], config, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """speedlm names for a `FalconH1ForCausalLM` state dict, every multiplier folded (in float64,
    then stored as `dtype`)."""
    w = {k: v.detach().to(torch.float64) for k, v in hf_state.items()}
    a_in, gate_m, down_m = float(config.attention_in_multiplier), *map(float, config.mlp_multipliers)
    emb_m, head_m = float(config.embedding_multiplier), float(config.lm_head_multiplier)
    out = {"embed.weight": w["model.embed_tokens.weight"] * emb_m, "norm.weight": w["model.final_layernorm.weight"]}
    if config.tie_word_embeddings:  # the head reads the scaled embedding: undo that scale, apply the head's
        out["lm_head.weight"] = out["embed.weight"]
        out["norm.weight"] = out["norm.weight"] * (head_m / emb_m)
    else:
        out["lm_head.weight"] = w["lm_head.weight"] * head_m
    in_scale = _in_proj_scale(config)[:, None]
    for i in range(config.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"blocks.{i}."
        attn, ssm = src + "self_attn.", src + "mamba."
        out[dst + "mixer_norm.weight"] = w[src + "input_layernorm.weight"]
        out[dst + "ffn_norm.weight"] = w[src + "pre_ff_layernorm.weight"]
        out[dst + "mixer.attn.q_proj.weight"] = w[attn + "q_proj.weight"] * a_in
        out[dst + "mixer.attn.k_proj.weight"] = w[attn + "k_proj.weight"] * (a_in * float(config.key_multiplier))
        out[dst + "mixer.attn.v_proj.weight"] = w[attn + "v_proj.weight"] * a_in
        out[dst + "mixer.attn.o_proj.weight"] = w[attn + "o_proj.weight"] * float(config.attention_out_multiplier)
        out[dst + "mixer.ssm.in_proj.weight"] = w[ssm + "in_proj.weight"] * in_scale
        out[dst + "mixer.ssm.conv.weight"] = w[ssm + "conv1d.weight"][:, 0]  # depthwise: (C, 1, K)
        if config.mamba_conv_bias:
            out[dst + "mixer.ssm.conv.bias"] = w[ssm + "conv1d.bias"]
        for name in ("A_log", "D", "dt_bias"):
            out[dst + "mixer.ssm." + name] = w[ssm + name]
        if config.mamba_rms_norm:
            out[dst + "mixer.ssm.norm_weight"] = w[ssm + "norm.weight"]
        out[dst + "mixer.ssm.out_proj.weight"] = w[ssm + "out_proj.weight"] * float(config.ssm_out_multiplier)
        out[dst + "ffn.gate.weight"] = w[src + "feed_forward.gate_proj.weight"] * gate_m
        out[dst + "ffn.up.weight"] = w[src + "feed_forward.up_proj.weight"]
        out[dst + "ffn.down.weight"] = w[src + "feed_forward.down_proj.weight"] * down_m
    return {k: v.to(dtype).contiguous() for k, v in out.items()}


def from_falcon_h1(hf_model):
    """A speedlm `CausalLM` with the weights of a loaded Hugging Face `FalconH1ForCausalLM`."""
    from speedlm.hf.convert import build_with_weights

    config = falcon_h1_model_config(hf_model.config)
    return build_with_weights(config, falcon_h1_state_dict(hf_model.state_dict(), hf_model.config))


__all__ = ["falcon_h1_model_config", "falcon_h1_state_dict", "from_falcon_h1"]
