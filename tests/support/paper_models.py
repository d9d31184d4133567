"""Hugging Face implementations of the architectures that speedlm's presets name (Jamba, Mixtral,
Mamba, Mamba-2), built at a preset's sizes, and the weight maps onto the preset's model. Import
after `pytest.importorskip("transformers")`.

The reference models cast norms, router softmaxes, rotary angles and scans to float32 whatever
their dtype; `float64_reference()` turns those casts of float64 tensors into no-ops while the
reference runs, so a float64 comparison measures the architectures, not float32 rounding.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from speedlm.models.config import ModelConfig
from support.hf_models import rel_err  # noqa: F401  (quiets transformers; the tests' closeness metric)

NO_SPECIAL_TOKENS = dict(pad_token_id=None, bos_token_id=None, eos_token_id=None)


@contextmanager
def float64_reference():
    """While active, `.float()`, `.to(torch.float32)` and `softmax(..., dtype=torch.float32)` leave
    float64 tensors in float64 (process-wide: run only the reference inside it)."""
    to, float_, softmax = torch.Tensor.to, torch.Tensor.float, F.softmax

    def keep_to(self, *args, **kwargs):
        if self.dtype == torch.float64 and (torch.float32 in args or kwargs.get("dtype") == torch.float32):
            return self
        return to(self, *args, **kwargs)

    def keep_float(self, *args, **kwargs):
        return self if self.dtype == torch.float64 else float_(self, *args, **kwargs)

    def keep_softmax(input, dim=None, _stacklevel=3, dtype=None):
        return softmax(input, dim=dim, dtype=None if input.dtype == torch.float64 else dtype)

    torch.Tensor.to, torch.Tensor.float, F.softmax = keep_to, keep_float, keep_softmax
    try:
        yield
    finally:
        torch.Tensor.to, torch.Tensor.float, F.softmax = to, float_, softmax


def prepare_reference(hf, seed: int = 0):
    """float64, eval mode, rotary frequencies recomputed in float64, and noise on the parameters
    that initialise to constants (norm gains, A_log, D, dt biases), so that a map that swaps two
    of them shows."""
    hf = hf.eval().to(torch.float64)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() == 1 or name.endswith("A_log"):
                p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        for module in hf.modules():
            if hasattr(module, "inv_freq"):
                dim, theta = 2 * module.inv_freq.numel(), hf.config.rope_parameters["rope_theta"]
                module.inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
                module.original_inv_freq = module.inv_freq
    return hf


def _common(config: ModelConfig) -> dict:
    return dict(vocab_size=config.vocab_size, hidden_size=config.d_model, num_hidden_layers=config.n_layers,
                tie_word_embeddings=config.tie_embeddings, initializer_range=0.1, **NO_SPECIAL_TOKENS)


def _swiglu_experts(state: dict, prefix: str, hidden: int) -> dict:
    """Hugging Face's stacked experts (gate_up (E, 2H, D), down (E, D, H)) as speedlm's MoE
    weights (w_gate, w_up (E, D, H), w_down (E, H, D))."""
    gate_up = state[prefix + "gate_up_proj"]
    return {"w_gate": gate_up[:, :hidden].transpose(1, 2), "w_up": gate_up[:, hidden:].transpose(1, 2),
            "w_down": state[prefix + "down_proj"].transpose(1, 2)}


def _heads(state: dict, src: str, dst: str) -> dict:
    return {f"{dst}{p}_proj.weight": state[f"{src}{p}_proj.weight"] for p in "qkvo"}


def _embeddings(state: dict, embed: str, norm: str, tied: bool) -> dict:
    out = {"embed.weight": state[embed], "norm.weight": state[norm]}
    out["lm_head.weight"] = out["embed.weight"] if tied else state["lm_head.weight"]
    return out


# ----- Jamba ---------------------------------------------------------------------------------
def jamba(config: ModelConfig, seed: int = 0):
    """A JambaForCausalLM at the sizes of a `jamba` preset config (its layout: attention every
    8th layer at offset 4, MoE every other layer from layer 1)."""
    from transformers import JambaConfig, JambaForCausalLM

    specs = config.layer_specs()
    attn = next(s["mixer"] for s in specs if s["mixer"]["name"] == "attention")
    moe = next(s["ffn"] for s in specs if s["ffn"]["name"] == "moe")
    mamba = next(s["mixer"] for s in specs if s["mixer"]["name"] == "mamba")
    hf_config = JambaConfig(
        **_common(config), intermediate_size=config.hidden_dim, num_attention_heads=config.n_heads,
        num_key_value_heads=attn["kv_heads"], num_experts=moe["experts"], num_experts_per_tok=moe["top_k"],
        attn_layer_period=8, attn_layer_offset=4, expert_layer_period=2, expert_layer_offset=1,
        mamba_d_state=mamba.get("d_state", 16), mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=-(-config.d_model // 16),
        rms_norm_eps=config.norm_eps, experts_implementation="eager",
    )
    torch.manual_seed(seed)
    return prepare_reference(JambaForCausalLM(hf_config), seed)


_MAMBA_NAMES = {name: name for name in ("in_proj.weight", "x_proj.weight", "dt_proj.weight", "dt_proj.bias", "A_log",
                                        "D", "out_proj.weight")}
_MAMBA_NAMES["conv1d.bias"] = "conv.bias"


def jamba_state_dict(hf, config: ModelConfig) -> dict:
    s = hf.state_dict()
    out = _embeddings(s, "model.embed_tokens.weight", "model.final_layernorm.weight", config.tie_embeddings)
    for i, spec in enumerate(config.layer_specs()):
        src, dst = f"model.layers.{i}.", f"blocks.{i}."
        out[dst + "mixer_norm.weight"] = s[src + "input_layernorm.weight"]
        out[dst + "ffn_norm.weight"] = s[src + "pre_ff_layernorm.weight"]
        if spec["mixer"]["name"] == "attention":
            out.update(_heads(s, src + "self_attn.", dst + "mixer."))
        else:
            m = src + "mamba."
            out.update({dst + "mixer." + b: s[m + a] for a, b in _MAMBA_NAMES.items()})
            out[dst + "mixer.conv.weight"] = s[m + "conv1d.weight"][:, 0]
            for a, b in (("dt_layernorm", "dt_norm"), ("b_layernorm", "b_norm"), ("c_layernorm", "c_norm")):
                out[f"{dst}mixer.{b}.weight"] = s[f"{m}{a}.weight"]
        f = src + "feed_forward."
        if spec["ffn"]["name"] == "moe":
            out[dst + "ffn.router.weight"] = s[f + "router.weight"]
            out.update({dst + "ffn." + k: v for k, v in _swiglu_experts(s, f + "experts.", config.hidden_dim).items()})
        else:
            out.update({f"{dst}ffn.{b}.weight": s[f"{f}{b}_proj.weight"] for b in ("gate", "up", "down")})
    return out


# ----- Mixtral -------------------------------------------------------------------------------
def mixtral(config: ModelConfig, seed: int = 0):
    from transformers import MixtralConfig, MixtralForCausalLM

    spec = config.layer_specs()[0]  # every layer: GQA attention + MoE
    hf_config = MixtralConfig(
        **_common(config), intermediate_size=config.hidden_dim, num_attention_heads=config.n_heads,
        num_key_value_heads=spec["mixer"]["kv_heads"], num_local_experts=spec["ffn"]["experts"],
        num_experts_per_tok=spec["ffn"]["top_k"], rms_norm_eps=config.norm_eps, sliding_window=None,
        max_position_embeddings=config.max_seq_len, rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        experts_implementation="eager",
    )
    torch.manual_seed(seed)
    return prepare_reference(MixtralForCausalLM(hf_config), seed)


def mixtral_state_dict(hf, config: ModelConfig) -> dict:
    s = hf.state_dict()
    out = _embeddings(s, "model.embed_tokens.weight", "model.norm.weight", config.tie_embeddings)
    for i in range(config.n_layers):
        src, dst = f"model.layers.{i}.", f"blocks.{i}."
        out[dst + "mixer_norm.weight"] = s[src + "input_layernorm.weight"]
        out[dst + "ffn_norm.weight"] = s[src + "post_attention_layernorm.weight"]
        out.update(_heads(s, src + "self_attn.", dst + "mixer."))
        out[dst + "ffn.router.weight"] = s[src + "mlp.gate.weight"]
        out.update({dst + "ffn." + k: v for k, v in _swiglu_experts(s, src + "mlp.experts.", config.hidden_dim).items()})
    return out


# ----- Mamba and Mamba-2 (no FFN: one norm and one mixer per block) ----------------------------
def mamba(config: ModelConfig, seed: int = 0):
    from transformers import MambaConfig, MambaForCausalLM

    mixer = config.layer_specs()[0]["mixer"]
    hf_config = MambaConfig(
        **_common(config), state_size=mixer.get("d_state", 16), expand=2, conv_kernel=4,
        time_step_rank=-(-config.d_model // 16), layer_norm_epsilon=config.norm_eps, use_bias=False, use_conv_bias=True,
    )
    torch.manual_seed(seed)
    return prepare_reference(MambaForCausalLM(hf_config), seed)


def mamba2(config: ModelConfig, seed: int = 0):
    from transformers import Mamba2Config, Mamba2ForCausalLM

    mixer = config.layer_specs()[0]["mixer"]
    head_dim, expand = mixer["head_dim"], mixer.get("expand", 2)
    hf_config = Mamba2Config(
        **_common(config), state_size=mixer.get("d_state", 64), expand=expand, head_dim=head_dim,
        num_heads=expand * config.d_model // head_dim, n_groups=mixer.get("n_groups", 1), conv_kernel=4,
        layer_norm_epsilon=config.norm_eps, use_bias=False, use_conv_bias=True, chunk_size=16,
    )
    torch.manual_seed(seed)
    return prepare_reference(Mamba2ForCausalLM(hf_config), seed)


def falcon_h1(config: ModelConfig, seed: int = 0):
    """A FalconH1ForCausalLM at the sizes of a `falcon-h1` preset config, its muP multipliers all 1
    (the preset's model is the plain sum they fold into), the gated norm after the gate."""
    from transformers import FalconH1Config, FalconH1ForCausalLM

    mixer = config.layer_specs()[0]["mixer"]
    hf_config = FalconH1Config(
        **_common(config), intermediate_size=config.hidden_dim, num_attention_heads=config.n_heads,
        num_key_value_heads=mixer.get("kv_heads") or config.n_heads, max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        mamba_d_ssm=mixer["d_inner"], mamba_n_heads=mixer["d_inner"] // mixer["ssm_head_dim"],
        mamba_d_head=mixer["ssm_head_dim"], mamba_d_state=mixer["d_state"], mamba_n_groups=mixer.get("n_groups", 1),
        mamba_chunk_size=16, mamba_rms_norm=True, mamba_norm_before_gate=False,
    )
    torch.manual_seed(seed)
    return prepare_reference(FalconH1ForCausalLM(hf_config), seed)


def falcon_h1_state_dict(hf, config: ModelConfig) -> dict:
    """The importer's map (names; its multipliers are 1 here), kept in float64."""
    from speedlm.hf.falcon_h1 import falcon_h1_state_dict as imported

    return imported(hf.state_dict(), hf.config, dtype=torch.float64)


def mamba_state_dict(hf, config: ModelConfig) -> dict:
    """Mamba or Mamba-2 (`backbone.layers.i.{norm, mixer}`)."""
    s = hf.state_dict()
    out = _embeddings(s, "backbone.embeddings.weight", "backbone.norm_f.weight", config.tie_embeddings)
    for i in range(config.n_layers):
        src, dst = f"backbone.layers.{i}.", f"blocks.{i}."
        out[dst + "mixer_norm.weight"] = s[src + "norm.weight"]
        for name, value in s.items():
            if name.startswith(src + "mixer."):
                key = name[len(src + "mixer."):]
                key = {"conv1d.weight": "conv.weight", "conv1d.bias": "conv.bias", "norm.weight": "norm_weight"}.get(key, key)
                out[dst + "mixer." + key] = value[:, 0] if key == "conv.weight" else value
    return out
