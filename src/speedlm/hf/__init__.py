"""Hugging Face integration (the optional extra `hf`: `pip install "speedlm[hf]"`).

Importing this module registers speedlm's model with the Auto classes, so exported folders load
with `AutoModelForCausalLM.from_pretrained` without remote code.

- `export_checkpoint(checkpoint, out)`: a speedlm checkpoint as a Hugging Face model folder.
- `import_model(folder, out)` / `from_pretrained(model)`: a Hugging Face causal LM of a supported
  architecture (`CONVERTERS`: Llama, Mistral, Mamba, FalconMamba, Mamba-2, Mixtral, Jamba, Qwen2,
  Qwen3, Qwen2-MoE, Qwen3-MoE) as a speedlm model, weight for weight;
- `import_llama(folder, out)` / `from_llama(model)`: a Llama-architecture Hugging Face model as
  speedlm's transformer; `from_mamba(model)`: a `MambaForCausalLM` / `FalconMambaForCausalLM` /
  `Mamba2ForCausalLM` as speedlm's `mamba` / `mamba2` layout; `to_llama(model)`
  (`export_checkpoint(..., format="llama")`) the reverse, a plain `LlamaForCausalLM` that loads without speedlm.
- `sepllm(model, ...)`: training-free SepLLM / StreamingLLM attention and KV caches on a loaded
  Hugging Face Llama, Mistral or Qwen2 model (hf/sepllm.py).
"""

from __future__ import annotations

from speedlm.errors import SpeedlmError

try:
    import transformers  # noqa: F401
except ImportError:  # pragma: no cover - depends on the environment
    raise SpeedlmError('the Hugging Face integration needs transformers: pip install "speedlm[hf]"') from None

from transformers import AutoConfig, AutoModelForCausalLM

from speedlm.hf.export import export_checkpoint, to_hf_model
from speedlm.hf.imports import CONVERTERS, check_importable, from_pretrained, import_model
from speedlm.hf.llama import from_llama, import_llama, llama_config, llama_model_config, to_llama
from speedlm.hf.mamba import from_mamba, mamba_model_config
from speedlm.hf.mixtral import from_mixtral, mixtral_model_config
from speedlm.hf.qwen import from_qwen, qwen_model_config
from speedlm.hf.modeling import MODEL_TYPE, SpeedlmCache, SpeedlmConfig, SpeedlmForCausalLM
from speedlm.hf.sepllm import ATTENTION, PolicyCache, SepLLM, separator_ids_of, sepllm
from speedlm.hf.tokenizer import to_hf_tokenizer

AutoConfig.register(MODEL_TYPE, SpeedlmConfig, exist_ok=True)
AutoModelForCausalLM.register(SpeedlmConfig, SpeedlmForCausalLM, exist_ok=True)

__all__ = [
    "ATTENTION",
    "CONVERTERS",
    "check_importable",
    "from_mamba",
    "from_mixtral",
    "mixtral_model_config",
    "from_qwen",
    "qwen_model_config",
    "from_pretrained",
    "import_model",
    "mamba_model_config",
    "PolicyCache",
    "SepLLM",
    "separator_ids_of",
    "sepllm",
    "SpeedlmCache",
    "SpeedlmConfig",
    "SpeedlmForCausalLM",
    "export_checkpoint",
    "from_llama",
    "import_llama",
    "llama_config",
    "llama_model_config",
    "to_llama",
    "to_hf_model",
    "to_hf_tokenizer",
]
