"""Hugging Face Qwen2 and Qwen3 checkpoints imported onto speedlm's transformer with the options
of `attention` they need (speedlm/hf/qwen.py): q/k/v biases (Qwen2), per-head q/k RMSNorm and a
head width of its own (Qwen3). Transformers' logits and greedy tokens, speedlm's cached decoding
equal to its forward, and refusals by name."""

import pytest
import torch

pytest.importorskip("transformers")

from support.hf_models import COMMON, imported_matches, rel_err  # noqa: E402

from speedlm.checkpoint.pretrained import load_pretrained  # noqa: E402
from speedlm.cli import main  # noqa: E402
from speedlm.data.tokenizers import ByteTokenizer  # noqa: E402
from speedlm.errors import SpeedlmError  # noqa: E402
from speedlm.generate.loop import generate  # noqa: E402
from speedlm.hf import from_pretrained, to_hf_tokenizer  # noqa: E402


def tiny_qwen(arch: str, dtype=torch.float64, seed=0, **overrides):
    """A random Qwen2 / Qwen3 whose biases and norm gains are random too (transformers initialises
    them to 0 and 1, which would let an import that drops them pass)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    config_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[arch]
    config = config_cls(**{**COMMON, "rope_parameters": {"rope_type": "default", "rope_theta": 5000.0}, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model.to(dtype)


CASES = {
    "qwen2-untied": ("qwen2", {}),
    "qwen2-tied-mha": ("qwen2", {"tie_word_embeddings": True, "num_key_value_heads": 4}),
    "qwen3-untied-head_dim": ("qwen3", {"head_dim": 16}),  # 4 heads of 16 on a width of 32
    "qwen3-tied-mqa": ("qwen3", {"tie_word_embeddings": True, "num_key_value_heads": 1, "head_dim": 8}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_imported_qwen_computes_the_same_logits_tokens_and_cached_steps(case):
    arch, overrides = CASES[case]
    hf = tiny_qwen(arch, **overrides)
    ours = from_pretrained(hf).to(torch.float64)
    mixer = ours.config.layers["A"]["mixer"]
    assert mixer.get("qkv_bias", False) == (arch == "qwen2") and mixer.get("qk_norm", False) == (arch == "qwen3")
    assert mixer.get("head_dim") == (16 if overrides.get("head_dim") == 16 else None)  # only where it is not 32 / 4
    assert ours.config.tie_embeddings == overrides.get("tie_word_embeddings", False)
    assert ours.num_params() == sum(p.numel() for p in hf.parameters())
    ids = torch.randint(0, 64, (2, 31), generator=torch.Generator().manual_seed(1))
    imported_matches(ours, hf, ids, prefill=7)  # transformers computes RoPE angles and norms in float32
    with torch.no_grad():
        hf_tokens = hf.generate(ids[:, :9], max_new_tokens=14, do_sample=False)
    assert torch.equal(generate(ours, ids[:, :9], 14).ids, hf_tokens)


@pytest.mark.parametrize("arch, overrides, reason", [
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}, "use_sliding_window"),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 8}, "use_sliding_window"),
    ("qwen3", {"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
    ("qwen3", {"attention_bias": True}, "attention_bias"),
    ("qwen2", {"hidden_act": "gelu"}, "activation"),
    ("qwen3", {"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4,
                                   "original_max_position_embeddings": 256}}, "scaled RoPE"),
])
def test_what_speedlm_cannot_honour_is_refused_by_name(arch, overrides, reason):
    with pytest.raises(SpeedlmError, match=reason):
        from_pretrained(tiny_qwen(arch, dtype=torch.float32, **overrides))


def test_hf_import_writes_a_qwen2_checkpoint_with_the_same_logits(tmp_path):
    hf = tiny_qwen("qwen2", dtype=torch.float32, vocab_size=256)
    hf.save_pretrained(tmp_path / "hf")
    to_hf_tokenizer(ByteTokenizer()).save_pretrained(tmp_path / "hf")
    assert main(["hf", "import", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    pre = load_pretrained(tmp_path / "run")
    assert pre.model.config.layers["A"]["mixer"]["qkv_bias"] is True
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel_err(pre.model(ids), hf(ids).logits) < 1e-5
