"""Hugging Face checkpoints into speedlm, by architecture: each supported `model_type` has a
converter (a config check that refuses with the reason, and a weight-for-weight state dict),
and `import_model` writes any of them as a speedlm checkpoint. Supported so far: Llama and
Mistral (hf/llama.py, onto the transformer), Mamba, FalconMamba and Mamba-2 (hf/mamba.py, onto the
`mamba` and `mamba2` layouts), Jamba (hf/jamba.py, onto the `jamba` layout), Mixtral
(hf/mixtral.py, attention + `moe`), Qwen2 and Qwen3 (hf/qwen.py, the transformer with `attention`'s
qkv_bias / qk_norm / head_dim options), Qwen2-MoE and Qwen3-MoE
(hf/qwen_moe.py, attention + `moe` and dense layers), Qwen3-Next (hf/qwen3_next.py,
`gated_deltanet` and gated attention layers with `moe`), Falcon-H1 (hf/falcon_h1.py, onto
`parallel_hybrid`, its muP multipliers folded into the weights)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from speedlm.errors import SpeedlmError
from speedlm.hf.falcon_h1 import falcon_h1_model_config, from_falcon_h1
from speedlm.hf.jamba import from_jamba, jamba_model_config
from speedlm.hf.llama import from_llama, llama_model_config
from speedlm.hf.mamba import from_mamba, mamba_model_config
from speedlm.hf.mixtral import from_mixtral, mixtral_model_config
from speedlm.hf.qwen import from_qwen, qwen_model_config
from speedlm.hf.qwen_moe import from_qwen_moe, qwen_moe_model_config
from speedlm.hf.qwen3_next import from_qwen3_next, qwen3_next_model_config

# model_type -> (its speedlm ModelConfig, or SpeedlmError; the speedlm model with its weights)
CONVERTERS = {
    "llama": (llama_model_config, from_llama),
    "mistral": (llama_model_config, from_llama),
    "mamba": (mamba_model_config, from_mamba),
    "falcon_mamba": (mamba_model_config, from_mamba),
    "mamba2": (mamba_model_config, from_mamba),
    "mixtral": (mixtral_model_config, from_mixtral),
    "qwen2": (qwen_model_config, from_qwen),
    "qwen3": (qwen_model_config, from_qwen),
    "jamba": (jamba_model_config, from_jamba),
    "qwen2_moe": (qwen_moe_model_config, from_qwen_moe),
    "qwen3_moe": (qwen_moe_model_config, from_qwen_moe),
    "qwen3_next": (qwen3_next_model_config, from_qwen3_next),
    "falcon_h1": (falcon_h1_model_config, from_falcon_h1),
}


def _converter(config):
    kind = getattr(config, "model_type", None)
    if kind not in CONVERTERS:
        raise SpeedlmError(f"no speedlm import for Hugging Face model type {kind!r}; supported: {', '.join(CONVERTERS)}")
    return CONVERTERS[kind]


def check_importable(config) -> None:
    """Raises SpeedlmError naming what speedlm cannot represent exactly in this config."""
    _converter(config)[0](config)


def from_pretrained(hf_model):
    """A speedlm `CausalLM` with the weights of a loaded Hugging Face causal LM of a supported
    architecture (`CONVERTERS`)."""
    return _converter(hf_model.config)[1](hf_model)


def hf_config_dict(hf_config) -> dict:
    """The JSON form of a transformers config (every field, as `config.json` writes it)."""
    import json

    return json.loads(hf_config.to_json_string(use_diff=False))


def native_config(state: dict):
    """The transformers config an imported checkpoint came from (its trainer state's
    "hf_config"), or SpeedlmError when it was not imported."""
    from transformers import AutoConfig, PretrainedConfig

    d = state.get("hf_config")
    if not d:
        raise SpeedlmError("this checkpoint was not imported from Hugging Face (speedlm hf import), so it has no "
                           "native class; export it with --format speedlm (or llama for a full-attention transformer)")
    d = PretrainedConfig._decode_special_floats(dict(d))  # {"__float__": "Infinity"}, as config.json holds it
    return AutoConfig.for_model(d.pop("model_type"), **d)


def is_hf_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a Hugging Face model folder (a config.json with a model_type) rather
    than a speedlm run or step folder."""
    import json

    p = Path(path)
    config = p / "config.json"
    if not config.is_file() or (p / "trainer_state.json").is_file() or (p / "latest").exists():
        return False
    try:
        return "model_type" in json.loads(config.read_text())
    except (OSError, ValueError):
        return False


def load_hf(source: str | os.PathLike, only: tuple[str, ...] | None = None):
    """(speedlm model, tokenizer, checkpoint state) of the Hugging Face folder `source` (a
    causal LM of a supported architecture with its tokenizer.json), in memory; nothing written.
    Ids are the Hugging Face tokenizer's, without added special tokens. `only`: the model types
    accepted (default: every supported one)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from speedlm.data.tokenizers import BPE_FILE, BPETokenizer

    source = Path(source)
    tok_file = source / BPE_FILE
    if not tok_file.is_file():
        raise SpeedlmError(f"{source} has no {BPE_FILE}; speedlm imports models with their fast tokenizer file")
    try:
        hf_config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise SpeedlmError(f"cannot read a Hugging Face config from {source}: {str(e).splitlines()[0]}") from None
    kind = getattr(hf_config, "model_type", None)
    if only is not None and kind not in only:
        raise SpeedlmError(f"expected a model of type {' or '.join(only)}; {source} holds {kind!r}")
    check_importable(hf_config)  # refuse before loading the weights
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as e:
        raise SpeedlmError(f"cannot load the Hugging Face model in {source}: {str(e).splitlines()[0]}") from None
    model = from_pretrained(hf_model)
    tokenizer = BPETokenizer.from_file(tok_file, model.config.vocab_size)
    # the original config travels with the weights: `speedlm hf export --format native` rebuilds its class
    state = {"tokenizer": tokenizer.spec(), "imported_from": str(source), "hf_config": hf_config_dict(hf_config)}
    return model, tokenizer, state


def import_model(source: str | os.PathLike, out: str | os.PathLike, only: tuple[str, ...] | None = None) -> Path:
    """Load the Hugging Face folder `source` (`load_hf`) and save it as a speedlm checkpoint
    (run folder `out`, step 0); returns the step folder."""
    from speedlm.checkpoint.files import publish_step

    model, tokenizer, state = load_hf(source, only)
    return publish_step(Path(out), 0, model, state, write_files=tokenizer.save)


__all__ = ["CONVERTERS", "check_importable", "from_pretrained", "hf_config_dict", "import_model", "is_hf_folder", "load_hf",
           "native_config"]
