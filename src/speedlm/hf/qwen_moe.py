"""Import Hugging Face Qwen2-MoE (`Qwen2MoeForCausalLM`, Qwen1.5-MoE / Qwen2-57B-A14B) and
Qwen3-MoE (`Qwen3MoeForCausalLM`) checkpoints onto speedlm's attention + `moe` layers.

The layer is Llama's pre-norm block (hf/llama.py's checks) with Qwen's attention: q/k/v biases
(`qkv_bias`, Qwen2-MoE) or a per-head RMSNorm on queries and keys before RoPE (`qk_norm`,
Qwen3-MoE), a head width of its own where the config gives one (`head_dim`). The FFN is the `moe` FFN where the config makes
the layer sparse (`decoder_sparse_step`, except `mlp_only_layers`) and a dense SwiGLU of
`intermediate_size` elsewhere; speedlm writes the mix as a layer pattern, "E" (experts) and "D"
(dense) letters, the shortest string that tiles the depth.

- Routing: softmax over `num_experts` in float32, the top `num_experts_per_tok`, renormalised over
  them when `norm_topk_prob` (speedlm's `renormalize`). speedlm's top-1 keeps the raw
  probability, which is Qwen's top-1 without `norm_topk_prob` but not with it (a weight of 1):
  that pair is refused.
- Qwen2-MoE's shared expert: a SwiGLU of `shared_expert_intermediate_size` (`shared_hidden`),
  scaled per token by sigmoid(shared_expert_gate(x)) (`shared_gate`). Qwen3-MoE has none.
- transformers stacks the experts (gate_up (E, 2H, D), down (E, D, H)); speedlm keeps (E, D, H)
  and (E, H, D) per matrix, as in hf/mixtral.py.

Numerics: transformers computes the router logits in the model's dtype and the softmax in
float32; speedlm computes both in float32 at least (the same for a float32 model; for a float64
model speedlm's routing weights are the float64 ones, within float32 rounding of transformers').
The router's auxiliary loss (`router_aux_loss_coef`, `output_router_logits`) is training only:
an imported model trains with speedlm's own balance and z losses.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch

from speedlm.errors import SpeedlmError
from speedlm.hf.llama import transformer_model_config
from speedlm.models.config import ModelConfig

IMPORTABLE = ("qwen2_moe", "qwen3_moe")
DENSE, SPARSE = "D", "E"


def sparse_layers(config) -> list[bool]:
    """Which layers hold the MoE block, by transformers' rule (Qwen2MoeDecoderLayer)."""
    step, dense_only = config.decoder_sparse_step, set(config.mlp_only_layers or ())
    return [i not in dense_only and config.num_experts > 0 and (i + 1) % step == 0
            for i in range(config.num_hidden_layers)]


def shortest_tiling(letters: str) -> str:
    """The shortest prefix of `letters` that repeated gives `letters` (the whole string at worst)."""
    n = len(letters)
    return next(letters[:p] for p in range(1, n + 1) if n % p == 0 and letters[:p] * (n // p) == letters)


def _transformer(config) -> ModelConfig:
    """The Llama-family checks and attention (hf/llama.py) with Qwen's options: `qkv_bias`
    (Qwen2-MoE) or `qk_norm` (Qwen3-MoE). The sliding window is checked here: Qwen2-MoE writes a
    disabled window as sliding_window=0, which the shared check would read as a window."""
    if getattr(config, "use_sliding_window", False) or any(
            t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
        raise SpeedlmError(f"use_sliding_window=True / layer_types (a sliding window of {config.sliding_window}) "
                           "is not imported; only full-attention Qwen-MoE models import")
    config = copy.copy(config)
    config.sliding_window = None
    if config.model_type == "qwen2_moe":
        return transformer_model_config(config, qkv_bias=bool(config.qkv_bias))
    return transformer_model_config(config, qk_norm=True)


def _moe_spec(config) -> dict:
    """The `moe` FFN spec of a Qwen-MoE sparse layer (hf/qwen3_next.py uses it too)."""
    if config.num_experts_per_tok == 1 and config.norm_topk_prob:  # speedlm's top-1 is Switch's
        raise SpeedlmError("num_experts_per_tok=1 with norm_topk_prob=True: Qwen renormalises the chosen weight to 1, "
                           "speedlm's top-1 MoE scales by the router probability (Switch)")
    spec = {"name": "moe", "experts": config.num_experts, "top_k": config.num_experts_per_tok,
            "hidden": config.moe_intermediate_size, "renormalize": bool(config.norm_topk_prob)}
    # a zero-width shared expert adds nothing (its gate scales zeros): speedlm leaves it out
    if config.model_type == "qwen2_moe" and config.shared_expert_intermediate_size:
        spec.update(shared=1, shared_hidden=config.shared_expert_intermediate_size, shared_gate=True)
    return spec


def qwen_moe_model_config(config) -> ModelConfig:
    """The speedlm `ModelConfig` of a Hugging Face `Qwen2MoeConfig` or `Qwen3MoeConfig`, or
    SpeedlmError naming what does not agree."""
    kind = getattr(config, "model_type", None)
    if kind not in IMPORTABLE:
        raise SpeedlmError(f"not a Qwen2-MoE or Qwen3-MoE model; this one is {kind!r}")
    base = _transformer(config)
    mixer = base.layers["A"]["mixer"]
    sparse = sparse_layers(config)
    layers = {}
    if not all(sparse):
        layers[DENSE] = {"mixer": mixer}  # the model-wide swiglu of ffn_hidden = intermediate_size
    if any(sparse):
        layers[SPARSE] = {"mixer": mixer, "ffn": _moe_spec(config)}
    return replace(base, pattern=shortest_tiling("".join(SPARSE if s else DENSE for s in sparse)), layers=layers)


_ATTENTION = {
    "self_attn.q_proj": "mixer.q_proj",
    "self_attn.k_proj": "mixer.k_proj",
    "self_attn.v_proj": "mixer.v_proj",
    "self_attn.o_proj": "mixer.o_proj",
    "self_attn.q_norm": "mixer.q_norm",
    "self_attn.k_norm": "mixer.k_norm",
    "input_layernorm": "mixer_norm",
    "post_attention_layernorm": "ffn_norm",
}
_DENSE_MLP = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


def qwen_moe_state_dict(hf_state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """speedlm names for a Qwen2-MoE / Qwen3-MoE state dict (float32), per `config`'s layers."""
    out = {"embed.weight": hf_state["model.embed_tokens.weight"], "norm.weight": hf_state["model.norm.weight"]}
    out["lm_head.weight"] = out["embed.weight"] if config.tie_embeddings else hf_state["lm_head.weight"]
    for i, spec in enumerate(config.layer_specs()):
        src, dst = f"model.layers.{i}.", f"blocks.{i}."
        for a, b in _ATTENTION.items():
            for p in ("weight", "bias"):
                if f"{src}{a}.{p}" in hf_state:
                    out[f"{dst}{b}.{p}"] = hf_state[f"{src}{a}.{p}"]
        ffn = spec["ffn"]
        if ffn["name"] == "swiglu":
            for a, b in _DENSE_MLP.items():
                out[f"{dst}ffn.{b}.weight"] = hf_state[f"{src}mlp.{a}.weight"]
            continue
        hidden = ffn["hidden"]
        out[dst + "ffn.router.weight"] = hf_state[src + "mlp.gate.weight"]
        gate_up = hf_state[src + "mlp.experts.gate_up_proj"]  # (E, 2H, D): gate rows, then up rows
        out[dst + "ffn.w_gate"] = gate_up[:, :hidden].transpose(1, 2)
        out[dst + "ffn.w_up"] = gate_up[:, hidden:].transpose(1, 2)
        out[dst + "ffn.w_down"] = hf_state[src + "mlp.experts.down_proj"].transpose(1, 2)
        if ffn.get("shared"):
            for a, b in _DENSE_MLP.items():
                out[f"{dst}ffn.shared.{b}.weight"] = hf_state[f"{src}mlp.shared_expert.{a}.weight"]
            out[dst + "ffn.shared_gate.weight"] = hf_state[src + "mlp.shared_expert_gate.weight"]
    return {k: v.detach().to(torch.float32).contiguous() for k, v in out.items()}


def from_qwen_moe(hf_model):
    """A speedlm `CausalLM` with the weights of a loaded Hugging Face `Qwen2MoeForCausalLM` or
    `Qwen3MoeForCausalLM`."""
    from speedlm.hf.convert import build_with_weights

    config = qwen_moe_model_config(hf_model.config)
    return build_with_weights(config, qwen_moe_state_dict(hf_model.state_dict(), config))


__all__ = ["from_qwen_moe", "qwen_moe_model_config", "qwen_moe_state_dict"]
