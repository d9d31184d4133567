"""Import a Hugging Face Qwen3-Next checkpoint (`Qwen3NextForCausalLM`) into speedlm, weight for
weight: each layer's `layer_types` entry picks its mixer, and `decoder_sparse_step` /
`mlp_only_layers` its FFN.

- "linear_attention" -> `gated_deltanet` with Qwen3-Next's shapes: `linear_num_value_heads` value
  heads on `linear_num_key_heads` query/key heads (`heads` / `key_heads`), explicit head widths,
  the conv over q | k | v with silu, and FLA's L2-norm epsilon 1e-6 (`qk_norm_eps`). Its
  in_proj_qkvz / in_proj_ba are packed per key-head group ([q, k, v, z] and [b, a] of the group's
  value heads); they unpack to speedlm's q/k/v/g and beta/a projections. The gated output norm
  norm(o) * silu(z) is speedlm's out_norm then g_proj gate (its weight used as is).
- "full_attention" -> `attention` with an explicit head_dim, q/k RMSNorm, partial RoPE
  (`rope_dim` = head_dim * partial_rotary_factor) and a sigmoid output gate: q_proj's rows hold,
  per head, the query then the gate; they split into q_proj and g_proj.
- MoE layers -> `moe`: softmax top-k (renormalised when `norm_topk_prob`) plus one shared SwiGLU
  of `shared_expert_intermediate_size` scaled by sigmoid(shared_expert_gate(x)); the other layers
  a dense SwiGLU of `intermediate_size`.

Qwen3-Next's RMSNorms (the block norms, the final norm, q_norm, k_norm) are zero-centred: they
multiply by 1 + w. speedlm's gains take 1 + w at import (exact up to one rounding of the sum).
"""

from __future__ import annotations

import torch

from speedlm.errors import SpeedlmError
from speedlm.hf.llama import _rope_theta
from speedlm.hf.qwen_moe import _moe_spec, shortest_tiling, sparse_layers
from speedlm.models.config import ModelConfig

IMPORTABLE = ("qwen3_next",)
FLA_L2_EPS = 1e-6  # what Qwen3-Next's (and FLA's) l2norm adds to |q|^2, |k|^2
LETTERS = {("linear_attention", "moe"): "D", ("full_attention", "moe"): "A",
           ("linear_attention", "swiglu"): "d", ("full_attention", "swiglu"): "a"}


def _disagreements(config) -> list[str]:
    out = []
    if config.hidden_act != "silu":
        out.append(f"hidden_act={config.hidden_act!r} (speedlm's SwiGLU and DeltaNet conv use silu)")
    if config.attention_bias:
        out.append("attention_bias=True (speedlm's gated attention has no biases)")
    if config.hidden_size % config.num_attention_heads:
        out.append(f"hidden_size={config.hidden_size} not divisible by num_attention_heads={config.num_attention_heads}")
    unknown = sorted(set(config.layer_types) - {"linear_attention", "full_attention"})
    if unknown:
        out.append(f"layer_types {unknown} (speedlm maps linear_attention and full_attention)")
    if len(config.layer_types) != config.num_hidden_layers:
        out.append(f"layer_types has {len(config.layer_types)} entries for num_hidden_layers={config.num_hidden_layers}")
    if config.linear_num_value_heads % config.linear_num_key_heads:
        out.append(f"linear_num_value_heads={config.linear_num_value_heads} not a multiple of "
                   f"linear_num_key_heads={config.linear_num_key_heads}")
    if int(_head_dim(config) * _partial_rotary(config)) % 2:
        out.append(f"partial_rotary_factor={_partial_rotary(config)} gives an odd rotary width")
    if any(sparse_layers(config)) and config.shared_expert_intermediate_size < 1:
        out.append(f"shared_expert_intermediate_size={config.shared_expert_intermediate_size}")
    return out


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _partial_rotary(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)))


def _mixers(config) -> dict[str, dict]:
    head_dim = _head_dim(config)
    attention = {"name": "attention", "head_dim": head_dim, "qk_norm": True, "output_gate": True}
    if config.num_key_value_heads != config.num_attention_heads:
        attention["kv_heads"] = config.num_key_value_heads
    rope_dim = int(head_dim * _partial_rotary(config))
    if rope_dim != head_dim:
        attention["rope_dim"] = rope_dim
    deltanet = {"name": "gated_deltanet", "heads": config.linear_num_value_heads, "key_dim": config.linear_key_head_dim,
                "value_dim": config.linear_value_head_dim, "conv_kernel": config.linear_conv_kernel_dim,
                "qk_norm_eps": FLA_L2_EPS}
    if config.linear_num_key_heads != config.linear_num_value_heads:
        deltanet["key_heads"] = config.linear_num_key_heads
    return {"linear_attention": deltanet, "full_attention": attention}


def _moe(config) -> dict:
    """qwen_moe's spec (its top-1 refusal included) with Qwen3-Next's always-present shared expert."""
    return {**_moe_spec(config), "shared": 1, "shared_hidden": config.shared_expert_intermediate_size, "shared_gate": True}


def qwen3_next_model_config(config) -> ModelConfig:
    """The speedlm `ModelConfig` of a Hugging Face `Qwen3NextConfig`, or SpeedlmError naming what
    does not agree."""
    kind = getattr(config, "model_type", None)
    if kind not in IMPORTABLE:
        raise SpeedlmError(f"not a Qwen3-Next model; this one is {kind!r}")
    disagree = _disagreements(config)
    if disagree:
        raise SpeedlmError("this model's architecture differs from speedlm's Qwen3-Next layout: " + "; ".join(disagree))
    rope_theta = _rope_theta(config)  # refuses scaled RoPE by name
    mixers = _mixers(config)
    layers, letters = {}, ""
    for layer_type, sparse in zip(config.layer_types, sparse_layers(config)):
        letter = LETTERS[layer_type, "moe" if sparse else "swiglu"]
        layers[letter] = {"mixer": mixers[layer_type], "ffn": _moe(config) if sparse else {"name": "swiglu"}}
        letters += letter
    return ModelConfig(
        vocab_size=config.vocab_size,
        d_model=config.hidden_size,
        n_layers=config.num_hidden_layers,
        n_heads=config.num_attention_heads,
        pattern=shortest_tiling(letters),
        layers=layers,
        ffn_hidden=config.intermediate_size,
        max_seq_len=config.max_position_embeddings,
        tie_embeddings=bool(config.tie_word_embeddings),
        rope_theta=rope_theta,
        norm_eps=float(config.rms_norm_eps),
        init_std=float(config.initializer_range),
    )


def _centred(w: torch.Tensor) -> torch.Tensor:
    """A zero-centred RMSNorm weight (the norm multiplies by 1 + w) as speedlm's gain."""
    return 1.0 + w


def _attention(hf: dict, src: str, dst: str, heads: int, head_dim: int) -> dict:
    """q_proj's rows are, per head, head_dim query rows then head_dim gate rows."""
    q_and_gate = hf[src + "q_proj.weight"].view(heads, 2, head_dim, -1)
    return {
        dst + "q_proj.weight": q_and_gate[:, 0].reshape(heads * head_dim, -1),
        dst + "g_proj.weight": q_and_gate[:, 1].reshape(heads * head_dim, -1),
        dst + "k_proj.weight": hf[src + "k_proj.weight"],
        dst + "v_proj.weight": hf[src + "v_proj.weight"],
        dst + "o_proj.weight": hf[src + "o_proj.weight"],
        dst + "q_norm.weight": _centred(hf[src + "q_norm.weight"]),
        dst + "k_norm.weight": _centred(hf[src + "k_norm.weight"]),
    }


def _gated_deltanet(hf: dict, src: str, dst: str, config) -> dict:
    """in_proj_qkvz rows, per key-head group: [q (dk), k (dk), v (r dv), z (r dv)], r value heads a
    group; in_proj_ba rows, per group: [b (r), a (r)]. Value head g r + j is the group's j-th."""
    nk, dk, dv = config.linear_num_key_heads, config.linear_key_head_dim, config.linear_value_head_dim
    r = config.linear_num_value_heads // nk
    d = config.hidden_size
    q, k, v, z = hf[src + "in_proj_qkvz.weight"].view(nk, -1, d).split([dk, dk, r * dv, r * dv], dim=1)
    b, a = hf[src + "in_proj_ba.weight"].view(nk, 2 * r, d).split([r, r], dim=1)
    return {
        dst + "q_proj.weight": q.reshape(-1, d), dst + "k_proj.weight": k.reshape(-1, d),
        dst + "v_proj.weight": v.reshape(-1, d), dst + "g_proj.weight": z.reshape(-1, d),
        dst + "beta_proj.weight": b.reshape(-1, d), dst + "a_proj.weight": a.reshape(-1, d),
        dst + "conv.weight": hf[src + "conv1d.weight"][:, 0],  # depthwise: (C, 1, K); channels q | k | v
        dst + "A_log": hf[src + "A_log"], dst + "dt_bias": hf[src + "dt_bias"],
        dst + "out_norm.weight": hf[src + "norm.weight"],  # the gated norm's weight is not zero-centred
        dst + "o_proj.weight": hf[src + "out_proj.weight"],
    }


def _ffn(hf: dict, src: str, dst: str, moe: bool, hidden: int) -> dict:
    if not moe:
        return {f"{dst}{b}.weight": hf[f"{src}{a}_proj.weight"] for a, b in (("gate", "gate"), ("up", "up"), ("down", "down"))}
    gate_up = hf[src + "experts.gate_up_proj"]  # (E, 2H, D): gate rows, then up rows
    out = {
        dst + "router.weight": hf[src + "gate.weight"],
        dst + "w_gate": gate_up[:, :hidden].transpose(1, 2),
        dst + "w_up": gate_up[:, hidden:].transpose(1, 2),
        dst + "w_down": hf[src + "experts.down_proj"].transpose(1, 2),
        dst + "shared_gate.weight": hf[src + "shared_expert_gate.weight"],
    }
    for name in ("gate", "up", "down"):
        out[f"{dst}shared.{name}.weight"] = hf[f"{src}shared_expert.{name}_proj.weight"]
    return out


def qwen3_next_state_dict(hf_state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """speedlm names for a `Qwen3NextForCausalLM` state dict (float32); `config` its HF config."""
    out = {"embed.weight": hf_state["model.embed_tokens.weight"], "norm.weight": _centred(hf_state["model.norm.weight"])}
    out["lm_head.weight"] = out["embed.weight"] if config.tie_word_embeddings else hf_state["lm_head.weight"]
    for i, (layer_type, sparse) in enumerate(zip(config.layer_types, sparse_layers(config))):
        src, dst = f"model.layers.{i}.", f"blocks.{i}."
        out[dst + "mixer_norm.weight"] = _centred(hf_state[src + "input_layernorm.weight"])
        out[dst + "ffn_norm.weight"] = _centred(hf_state[src + "post_attention_layernorm.weight"])
        if layer_type == "linear_attention":
            out.update(_gated_deltanet(hf_state, src + "linear_attn.", dst + "mixer.", config))
        else:
            out.update(_attention(hf_state, src + "self_attn.", dst + "mixer.", config.num_attention_heads, _head_dim(config)))
        out.update(_ffn(hf_state, src + "mlp.", dst + "ffn.", sparse, config.moe_intermediate_size))
    return {k: v.detach().to(torch.float32).contiguous() for k, v in out.items()}


def from_qwen3_next(hf_model):
    """A speedlm `CausalLM` with the weights of a loaded Hugging Face `Qwen3NextForCausalLM`."""
    from speedlm.hf.convert import build_with_weights

    config = qwen3_next_model_config(hf_model.config)
    return build_with_weights(config, qwen3_next_state_dict(hf_model.state_dict(), hf_model.config))


__all__ = ["from_qwen3_next", "qwen3_next_model_config", "qwen3_next_state_dict"]
