"""Export a speedlm checkpoint as a Hugging Face model folder: `config.json` (a `SpeedlmConfig`
carrying the speedlm model config), `model.safetensors`, `generation_config.json`, and the
tokenizer as `tokenizer.json` + `tokenizer_config.json`. With `speedlm.hf` imported,
`AutoModelForCausalLM.from_pretrained(folder)` and `AutoTokenizer.from_pretrained(folder)` load it
(no remote code), and `generate()` runs through the model's own speedlm caches."""

from __future__ import annotations

import os
from pathlib import Path

from speedlm.errors import SpeedlmError
from speedlm.hf.modeling import SpeedlmConfig, SpeedlmForCausalLM
from speedlm.hf.tokenizer import to_hf_tokenizer


def to_hf_model(model) -> SpeedlmForCausalLM:
    """A `SpeedlmForCausalLM` holding the weights of a speedlm `CausalLM` (copied)."""
    hf = SpeedlmForCausalLM(SpeedlmConfig.from_speedlm(model.config))
    hf.model.load_state_dict(model.state_dict())
    return hf.eval()


FORMATS = ("speedlm", "llama", "native")


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, format: str = "speedlm") -> Path:
    """Write the Hugging Face folder for a speedlm checkpoint (run or step folder) to `out`:
    format "speedlm" (any model; loads once `speedlm.hf` is imported), "llama" (full-attention
    transformers only; a plain `LlamaForCausalLM` that loads without speedlm) or "native" (a
    checkpoint made by `speedlm hf import`: its original transformers class, hf/native.py)."""
    if format not in FORMATS:
        raise SpeedlmError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    from speedlm.checkpoint.pretrained import load_pretrained

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SpeedlmError(f"{out} is a file; give a new folder for the export")
    if out.exists() and any(out.iterdir()):
        raise SpeedlmError(f"{out} exists and is not empty; choose a new folder for the export")
    pre = load_pretrained(checkpoint)
    if pre.model.config.objective != "ar":
        raise SpeedlmError(f"only autoregressive models export as causal LMs; {checkpoint} has objective={pre.model.config.objective!r}")
    if format == "llama":
        from speedlm.hf.llama import to_llama

        hf = to_llama(pre.model)
    elif format == "native":
        from speedlm.hf.imports import from_pretrained, native_config
        from speedlm.hf.native import to_native

        hf = to_native(pre.model, native_config(pre.trainer_state), from_pretrained)
    else:
        hf = to_hf_model(pre.model)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out)
    to_hf_tokenizer(pre.tokenizer).save_pretrained(out)
    return out
