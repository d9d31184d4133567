"""Import a Llama-architecture Hugging Face checkpoint into speedlm's transformer.

speedlm's `attention` + `swiglu` + pre-norm block is the Llama layer: half-split RoPE (the
layout Hugging Face's Llama uses), RMSNorm with a gain before the mixer and the FFN, a bias-free
SwiGLU, GQA through `kv_heads`. Where the architectures agree the weights map one to one; where
they do not (an output-projection or MLP bias, another activation, scaled or partial RoPE, a
sliding window) the import refuses with the reason instead of building a model that computes
something else. A head size other than width / heads is the attention's `head_dim` option.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from speedlm.errors import SpeedlmError
from speedlm.models.config import ModelConfig

IMPORTABLE = ("llama", "mistral")  # Mistral's layer is Llama's (without its sliding window)


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise SpeedlmError(f"RoPE type {rope_type!r} (scaled RoPE) has no speedlm counterpart; only the default RoPE imports")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise SpeedlmError("the Hugging Face config gives no rope_theta")
    return float(theta)


def llama_model_config(config) -> ModelConfig:
    """The speedlm `ModelConfig` of a Hugging Face Llama (or Mistral) config, or SpeedlmError
    naming what does not agree."""
    kind = getattr(config, "model_type", None)
    if kind not in IMPORTABLE:
        raise SpeedlmError(f"only Llama-architecture models import ({', '.join(IMPORTABLE)}); this one is {kind!r}")
    return transformer_model_config(config)


def transformer_model_config(config, **attention_options) -> ModelConfig:
    """The speedlm transformer (`attention` + `swiglu`, pre-norm) of a Llama-family config
    (Llama, Mistral, Qwen2, Qwen3, and the attention of Mixtral), or SpeedlmError naming what does
    not agree. `attention_options`: what the family adds to Llama's attention (Qwen2's
    `qkv_bias`, Qwen3's `qk_norm`), set on every layer's `attention` when true. An explicit
    head_dim other than width / heads becomes the attention's `head_dim` option."""
    heads, width = config.num_attention_heads, config.hidden_size
    disagree = []
    if getattr(config, "hidden_act", "silu") != "silu":
        disagree.append(f"activation {config.hidden_act!r} (speedlm's SwiGLU uses silu)")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        # Llama's and Qwen3's attention_bias puts a bias on o_proj too; speedlm's is bias-free
        disagree.append("biases in the attention or MLP projections (attention_bias / mlp_bias)")
    partial = (getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0)
    if partial != 1.0:
        disagree.append(f"partial_rotary_factor={partial} (this family's attention rotates whole heads)")
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        disagree.append(f"pretraining_tp={config.pretraining_tp}")
    if getattr(config, "sliding_window", None) is not None:
        disagree.append(f"a sliding window of {config.sliding_window}")
    if disagree:
        raise SpeedlmError("this model's architecture differs from speedlm's transformer: " + "; ".join(disagree))
    kv = config.num_key_value_heads or heads
    mixer = {"name": "attention"} if kv == heads else {"name": "attention", "kv_heads": kv}
    head_dim = getattr(config, "head_dim", None) or width // heads
    if head_dim * heads != width:
        mixer["head_dim"] = head_dim
    mixer.update({k: v for k, v in attention_options.items() if v})
    return ModelConfig(
        vocab_size=config.vocab_size,
        d_model=width,
        n_layers=config.num_hidden_layers,
        n_heads=heads,
        pattern="A",
        layers={"A": {"mixer": mixer}},
        ffn_hidden=config.intermediate_size,
        max_seq_len=config.max_position_embeddings,
        tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        rope_theta=_rope_theta(config),
        norm_eps=float(config.rms_norm_eps),
        init_std=float(getattr(config, "initializer_range", 0.02)),
    )


# the attention and the norms of a Llama-family layer (Mixtral's too), then Llama's MLP
ATTENTION_MAP = {
    "self_attn.q_proj": "mixer.q_proj",
    "self_attn.k_proj": "mixer.k_proj",
    "self_attn.v_proj": "mixer.v_proj",
    "self_attn.o_proj": "mixer.o_proj",
    "input_layernorm": "mixer_norm",
    "post_attention_layernorm": "ffn_norm",
}
_LAYER_MAP = {
    **ATTENTION_MAP,
    "mlp.gate_proj": "ffn.gate",
    "mlp.up_proj": "ffn.up",
    "mlp.down_proj": "ffn.down",
}


def llama_state_dict(hf_state: dict[str, torch.Tensor], n_layers: int, tied: bool) -> dict[str, torch.Tensor]:
    """speedlm names for a Llama state dict (float32)."""
    out = {"embed.weight": hf_state["model.embed_tokens.weight"], "norm.weight": hf_state["model.norm.weight"]}
    out["lm_head.weight"] = out["embed.weight"] if tied else hf_state["lm_head.weight"]
    for i in range(n_layers):
        for src, dst in _LAYER_MAP.items():
            out[f"blocks.{i}.{dst}.weight"] = hf_state[f"model.layers.{i}.{src}.weight"]
    return {k: v.detach().to(torch.float32) for k, v in out.items()}


def from_llama(hf_model):
    """A speedlm `CausalLM` with the weights of a loaded Hugging Face Llama causal LM."""
    from speedlm.hf.convert import build_with_weights

    config = llama_model_config(hf_model.config)
    return build_with_weights(config, llama_state_dict(hf_model.state_dict(), config.n_layers, config.tie_embeddings))


def llama_config(config: ModelConfig):
    """The Hugging Face `LlamaConfig` of a speedlm transformer (every layer `attention` +
    `swiglu` in the pre-norm block), or SpeedlmError naming the layer that is not Llama's."""
    from transformers import LlamaConfig

    kv = None
    for i, spec in enumerate(config.layer_specs()):
        mixer, ffn, block = spec["mixer"], spec["ffn"], spec["block"]
        extra = set(mixer) - {"name", "kv_heads"}
        if mixer["name"] != "attention" or extra or ffn != {"name": "swiglu"} or block["name"] != "prenorm":
            raise SpeedlmError(
                f"layer {i} ({mixer['name']} + {ffn['name']} in a {block['name']} block) is not a Llama layer; "
                "only full-attention transformers export as Llama (other models export as speedlm models)"
            )
        heads = mixer.get("kv_heads") or config.n_heads
        if kv not in (None, heads):
            raise SpeedlmError("layers with different numbers of key/value heads do not export as Llama")
        kv = heads
    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.hidden_dim,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=kv,
        max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        initializer_range=config.init_std,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def to_llama(model):
    """A Hugging Face `LlamaForCausalLM` with the weights of a speedlm transformer: loads in
    plain transformers, without speedlm."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM(llama_config(model.config))
    ours = model.state_dict()
    state = {"model.embed_tokens.weight": ours["embed.weight"], "model.norm.weight": ours["norm.weight"]}
    if not model.config.tie_embeddings:
        state["lm_head.weight"] = ours["lm_head.weight"]
    for i in range(model.config.n_layers):
        for src, dst in _LAYER_MAP.items():
            state[f"model.layers.{i}.{src}.weight"] = ours[f"blocks.{i}.{dst}.weight"]
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if model.config.tie_embeddings:
        hf.tie_weights()
    return hf.eval()


def import_llama(source: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Load the Hugging Face folder `source` (a Llama-architecture causal LM with its
    tokenizer.json) and save it as a speedlm checkpoint (run folder `out`, step 0); returns the
    step folder. `hf.imports.import_model` does the same for every supported architecture."""
    from speedlm.hf.imports import import_model

    return import_model(source, out, only=IMPORTABLE)
