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


def imported_matches(ours, hf, ids: torch.Tensor, prefill: int, tol: float = 1e-6) -> None:
    """An imported model against its transformers original on `ids`: the logits agree to `tol`
    (float32 level: transformers keeps some steps in float32 whatever the dtype), and speedlm's
    cached decoding (a prefill of `prefill` tokens, then one token per step) equals its own
    forward to float64 rounding."""
    with torch.no_grad():
        full = ours(ids)
        assert rel_err(full, hf(ids).logits) < tol
        cache = ours.init_cache()
        steps = [ours(ids[:, :prefill], cache)] + [ours(ids[:, i : i + 1], cache) for i in range(prefill, ids.shape[1])]
        assert rel_err(torch.cat(steps, dim=1), full) < 1e-12


def import_through_cli(hf, tmp_path, ids_seed: int = 2):
    """`hf` (float32, vocabulary 256) saved with a byte-level tokenizer, imported by
    `speedlm hf import` and loaded back: the checkpoint's `Pretrained`, whose logits were checked
    against `hf`'s. The Hugging Face folder is tmp_path / "hf", the run tmp_path / "run"."""
    from speedlm.checkpoint.pretrained import load_pretrained
    from speedlm.cli import main
    from speedlm.data.tokenizers import ByteTokenizer
    from speedlm.hf import to_hf_tokenizer

    hf.save_pretrained(tmp_path / "hf")
    to_hf_tokenizer(ByteTokenizer()).save_pretrained(tmp_path / "hf")
    assert main(["hf", "import", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    pre = load_pretrained(tmp_path / "run")
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(ids_seed))
    with torch.no_grad():
        assert rel_err(pre.model(ids), hf(ids).logits) < 1e-5
    return pre


def spread_mamba_mixers(model) -> None:
    """Decays, skips and conv taps of a transformers Mamba-family model away from their inits'
    narrow bands, so a misplaced weight shows in the logits."""
    with torch.no_grad():
        for layer in model.backbone.layers:
            layer.mixer.A_log.add_(torch.randn_like(layer.mixer.A_log) * 0.3)
            layer.mixer.D.add_(torch.randn_like(layer.mixer.D))
            layer.mixer.conv1d.weight.mul_(3)
