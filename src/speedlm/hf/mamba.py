"""Import a Hugging Face Mamba, FalconMamba or Mamba-2 checkpoint (`MambaForCausalLM`,
`FalconMambaForCausalLM`, `Mamba2ForCausalLM`) into speedlm's `mamba` / `mamba2` preset layout:
every layer an RMSNorm, the mixer and a residual, no FFN (as the papers' and transformers'
blocks), a final RMSNorm and the head.

FalconMamba is Mamba with RMS norms without gains on dt (before dt_proj, over dt_rank), B and C
(over the state size), with their own epsilon (`mixer_rms_eps`): speedlm's mamba with
`inner_norms`, `inner_norm_gains=False`, `inner_norm_eps`. transformers keeps unused all-ones
"weights" for these norms as non-persistent buffers; they are not part of the checkpoint.

The mixers' weights map one to one (Mamba: in_proj, the depthwise conv, x_proj, dt_proj, A_log,
D, out_proj; Mamba-2: in_proj as [z, xBC, dt], the conv over xBC, A_log, dt_bias, D, the gated
norm's weight, out_proj); the conv kernel loses its singleton channel axis, and a conv without
bias loads zeros. Where the configurations disagree (projection biases, another activation, a
clamp on Mamba-2's dt) the import refuses with the reason. transformers keeps the residual
stream in float32 (`residual_in_fp32`), which is what speedlm computes in float32 and float64
alike.

Found on the way (transformers 5, CPU torch path): Mamba-2's cached `generate()` disagrees with
its own forward after a prefill longer than its `chunk_size` (the cached state is off); its
forward agrees with speedlm's, so the tests take greedy tokens from its forward.
"""

from __future__ import annotations

import torch

from speedlm.errors import SpeedlmError
from speedlm.models.config import ModelConfig

IMPORTABLE = ("mamba", "falcon_mamba", "mamba2")
# no positions, no KV cache: the length a Mamba model runs is unbounded; speedlm's config wants a
# number for its position tables, which the mamba mixers do not use
_MAX_SEQ_LEN = 1 << 20


def _mixer(config, disagree: list[str]) -> dict:
    if config.model_type in ("mamba", "falcon_mamba"):
        mixer = {"name": "mamba", "d_state": config.state_size, "expand": config.expand,
                 "conv_kernel": config.conv_kernel, "dt_rank": config.time_step_rank}
        if config.model_type == "falcon_mamba":
            mixer.update(inner_norms=True, inner_norm_gains=False, inner_norm_eps=float(config.mixer_rms_eps))
        return mixer
    limit = tuple(getattr(config, "time_step_limit", (0.0, float("inf"))))
    if limit != (0.0, float("inf")):
        disagree.append(f"time_step_limit={limit} (speedlm's Mamba-2 does not clamp dt)")
    return {"name": "mamba2", "d_state": config.state_size, "expand": config.expand, "head_dim": config.head_dim,
            "n_groups": config.n_groups, "conv_kernel": config.conv_kernel}


def mamba_model_config(config) -> ModelConfig:
    """The speedlm `ModelConfig` of a Hugging Face `MambaConfig`, `FalconMambaConfig` or
    `Mamba2Config`, or SpeedlmError naming what does not agree."""
    kind = getattr(config, "model_type", None)
    if kind not in IMPORTABLE:
        raise SpeedlmError(f"not a Mamba model ({', '.join(IMPORTABLE)}); this one is {kind!r}")
    disagree = []
    if getattr(config, "hidden_act", "silu") != "silu":
        disagree.append(f"activation {config.hidden_act!r} (speedlm's Mamba gates with silu)")
    if getattr(config, "use_bias", False):
        disagree.append("biases in the input and output projections (use_bias=True)")
    mixer = _mixer(config, disagree)
    if disagree:
        raise SpeedlmError(f"this model's architecture differs from speedlm's {mixer['name']}: " + "; ".join(disagree))
    return ModelConfig(
        vocab_size=config.vocab_size,
        d_model=config.hidden_size,
        n_layers=config.num_hidden_layers,
        n_heads=1,  # no attention heads; the config's head count is unused by the mamba mixers
        pattern="M",
        layers={"M": {"mixer": mixer, "ffn": "none"}},
        max_seq_len=_MAX_SEQ_LEN,
        tie_embeddings=bool(getattr(config, "tie_word_embeddings", True)),
        norm_eps=float(config.layer_norm_epsilon),
        init_std=float(getattr(config, "initializer_range", 0.1)),
    )


# transformers' mixer names -> speedlm's, where they differ (Mamba-2's gated norm is a bare weight;
# Jamba's inner norms on dt, B, C have gains)
_RENAME = {"conv1d.weight": "conv.weight", "conv1d.bias": "conv.bias", "norm.weight": "norm_weight",
           "dt_layernorm.weight": "dt_norm.weight", "b_layernorm.weight": "b_norm.weight",
           "c_layernorm.weight": "c_norm.weight"}


def mixer_state_dict(hf_state: dict[str, torch.Tensor], src: str, dst: str) -> dict[str, torch.Tensor]:
    """The weights of one Mamba / Mamba-2 mixer, named `src`... in transformers, as speedlm's `dst`..."""
    out = {}
    for name, value in hf_state.items():
        if name.startswith(src):
            key = _RENAME.get(name[len(src) :], name[len(src) :])
            out[dst + key] = value[:, 0] if key == "conv.weight" else value  # depthwise: (C, 1, K)
    if dst + "conv.bias" not in out:  # no conv bias (use_conv_bias=False): speedlm's conv has one, here zeros
        weight = out[dst + "conv.weight"]
        out[dst + "conv.bias"] = torch.zeros(weight.shape[0], dtype=weight.dtype)
    return out


def mamba_state_dict(hf_state: dict[str, torch.Tensor], n_layers: int, tied: bool) -> dict[str, torch.Tensor]:
    """speedlm names for a `MambaForCausalLM`, `FalconMambaForCausalLM` or `Mamba2ForCausalLM`
    state dict (float32)."""
    out = {"embed.weight": hf_state["backbone.embeddings.weight"], "norm.weight": hf_state["backbone.norm_f.weight"]}
    out["lm_head.weight"] = out["embed.weight"] if tied else hf_state["lm_head.weight"]
    for i in range(n_layers):
        src, dst = f"backbone.layers.{i}.", f"blocks.{i}."
        out[dst + "mixer_norm.weight"] = hf_state[src + "norm.weight"]
        out.update(mixer_state_dict(hf_state, src + "mixer.", dst + "mixer."))
    return {k: v.detach().to(torch.float32) for k, v in out.items()}


def from_mamba(hf_model):
    """A speedlm `CausalLM` with the weights of a loaded Hugging Face `MambaForCausalLM`,
    `FalconMambaForCausalLM` or `Mamba2ForCausalLM`."""
    from speedlm.hf.convert import build_with_weights

    config = mamba_model_config(hf_model.config)
    return build_with_weights(config, mamba_state_dict(hf_model.state_dict(), config.n_layers, config.tie_embeddings))


__all__ = ["from_mamba", "mamba_model_config", "mamba_state_dict", "mixer_state_dict"]
