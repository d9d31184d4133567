"""Import a Hugging Face Mamba checkpoint (`MambaForCausalLM`) into speedlm's `mamba` preset
layout: every layer an RMSNorm, the `mamba` mixer and a residual, no FFN (as the paper's and
transformers' `MambaBlock`), a final RMSNorm and the (usually tied) head.

The mixer's weights map one to one (in_proj, the depthwise conv, x_proj, dt_proj, A_log, D,
out_proj; the conv kernel loses its singleton channel axis). Where the configurations disagree
(projection biases, another activation, a conv without bias is fine: its bias loads as zeros)
the import refuses with the reason. transformers keeps the residual stream in float32
(`residual_in_fp32`), which is what speedlm computes in float32 and float64 alike.
"""

from __future__ import annotations

import torch

from speedlm.errors import SpeedlmError
from speedlm.models.config import ModelConfig

IMPORTABLE = ("mamba",)
# no positions, no KV cache: the length a Mamba model runs is unbounded; speedlm's config wants a
# number for its position tables, which the mamba mixer does not use
_MAX_SEQ_LEN = 1 << 20


def mamba_model_config(config) -> ModelConfig:
    """The speedlm `ModelConfig` of a Hugging Face `MambaConfig`, or SpeedlmError naming what
    does not agree."""
    kind = getattr(config, "model_type", None)
    if kind not in IMPORTABLE:
        raise SpeedlmError(f"not a Mamba model ({', '.join(IMPORTABLE)}); this one is {kind!r}")
    disagree = []
    if getattr(config, "hidden_act", "silu") != "silu":
        disagree.append(f"activation {config.hidden_act!r} (speedlm's Mamba gates with silu)")
    if getattr(config, "use_bias", False):
        disagree.append("biases in the input and output projections (use_bias=True)")
    if disagree:
        raise SpeedlmError("this model's architecture differs from speedlm's Mamba: " + "; ".join(disagree))
    mixer = {"name": "mamba", "d_state": config.state_size, "expand": config.expand,
             "conv_kernel": config.conv_kernel, "dt_rank": config.time_step_rank}
    return ModelConfig(
        vocab_size=config.vocab_size,
        d_model=config.hidden_size,
        n_layers=config.num_hidden_layers,
        n_heads=1,  # no attention heads; the config's head count is unused by the mamba mixer
        pattern="M",
        layers={"M": {"mixer": mixer, "ffn": "none"}},
        max_seq_len=_MAX_SEQ_LEN,
        tie_embeddings=bool(getattr(config, "tie_word_embeddings", True)),
        norm_eps=float(config.layer_norm_epsilon),
        init_std=float(getattr(config, "initializer_range", 0.1)),
    )


_MIXER = ("in_proj.weight", "x_proj.weight", "dt_proj.weight", "dt_proj.bias", "A_log", "D", "out_proj.weight")


def mamba_state_dict(hf_state: dict[str, torch.Tensor], n_layers: int, tied: bool) -> dict[str, torch.Tensor]:
    """speedlm names for a `MambaForCausalLM` state dict (float32)."""
    out = {"embed.weight": hf_state["backbone.embeddings.weight"], "norm.weight": hf_state["backbone.norm_f.weight"]}
    out["lm_head.weight"] = out["embed.weight"] if tied else hf_state["lm_head.weight"]
    for i in range(n_layers):
        src, dst = f"backbone.layers.{i}.", f"blocks.{i}."
        out[dst + "mixer_norm.weight"] = hf_state[src + "norm.weight"]
        for name in _MIXER:
            out[dst + "mixer." + name] = hf_state[src + "mixer." + name]
        conv = hf_state[src + "mixer.conv1d.weight"]  # (channels, 1, kernel): depthwise
        out[dst + "mixer.conv.weight"] = conv[:, 0]
        bias = hf_state.get(src + "mixer.conv1d.bias")
        out[dst + "mixer.conv.bias"] = torch.zeros(conv.shape[0], dtype=conv.dtype) if bias is None else bias
    return {k: v.detach().to(torch.float32) for k, v in out.items()}


def from_mamba(hf_model):
    """A speedlm `CausalLM` with the weights of a loaded Hugging Face `MambaForCausalLM`."""
    from speedlm.hf.convert import build_with_weights

    config = mamba_model_config(hf_model.config)
    return build_with_weights(config, mamba_state_dict(hf_model.state_dict(), config.n_layers, config.tie_embeddings))


__all__ = ["from_mamba", "mamba_model_config", "mamba_state_dict"]
