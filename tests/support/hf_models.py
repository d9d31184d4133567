"""Tiny randomly initialised Hugging Face models built from configs (no downloads). Import
after `pytest.importorskip("transformers")`."""

import torch
import transformers

import speedlm.hf  # noqa: F401  (registers the Auto classes)

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

VOCAB = 64
COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, bos_token_id=None, eos_token_id=None, pad_token_id=None,
)
ARCHITECTURES = ("llama", "mistral", "qwen2")


def tiny_hf_model(arch: str, attn: str = "sdpa", dtype=torch.float64, seed: int = 0, **overrides):
    from transformers import (
        LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM,
    )

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
               "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    config_cls, model_cls = classes[arch]
    extra = {"sliding_window": None} if arch == "mistral" else {}
    config = config_cls(**{**COMMON, **extra, **overrides}, attn_implementation=attn)
    torch.manual_seed(seed)
    return model_cls(config).eval().to(dtype)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()
