"""Llama-architecture Hugging Face checkpoints imported into speedlm's transformer
(speedlm/hf/llama.py): same logits, same greedy tokens, refusals where the architectures differ."""

import pytest
import torch

pytest.importorskip("transformers")

from support.hf_models import rel_err, tiny_hf_model  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from speedlm.checkpoint.pretrained import load_pretrained  # noqa: E402
from speedlm.data.tokenizers import ByteTokenizer  # noqa: E402
from speedlm.errors import SpeedlmError  # noqa: E402
from speedlm.generate.loop import generate  # noqa: E402
from speedlm.hf import export_checkpoint, from_llama, import_llama, to_hf_tokenizer  # noqa: E402


@pytest.mark.parametrize("arch", ["llama", "mistral"])
@pytest.mark.parametrize("tied, kv_heads", [(False, 2), (True, 4), (False, 1)], ids=["gqa", "tied-mha", "mqa"])
def test_imported_llama_computes_the_same_logits_and_tokens(arch, tied, kv_heads):
    hf = tiny_hf_model(arch, tie_word_embeddings=tied, num_key_value_heads=kv_heads, rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
    ours = from_llama(hf).to(torch.float64)
    assert ours.config.tie_embeddings == tied and ours.config.rope_theta == 5000.0
    assert ours.num_params() == sum(p.numel() for p in hf.parameters())
    ids = torch.randint(0, 64, (2, 37))
    with torch.no_grad():
        # transformers computes RoPE angles in float32 (speedlm in float64): float32-level agreement
        assert rel_err(ours(ids), hf(ids).logits) < 1e-6
        hf_tokens = hf.generate(ids[:, :9], max_new_tokens=15, do_sample=False)
    assert torch.equal(generate(ours, ids[:, :9], 15).ids, hf_tokens)


def test_an_explicit_head_dim_imports_as_the_attention_head_dim_option():
    hf = tiny_hf_model("llama", head_dim=16)  # 4 heads of 16 on a width of 32
    ours = from_llama(hf).to(torch.float64)
    assert ours.config.layers["A"]["mixer"] == {"name": "attention", "kv_heads": 2, "head_dim": 16}
    assert ours.num_params() == sum(p.numel() for p in hf.parameters())
    ids = torch.randint(0, 64, (2, 29))
    with torch.no_grad():
        assert rel_err(ours(ids), hf(ids).logits) < 1e-6


def test_import_writes_a_speedlm_checkpoint_that_exports_back(tmp_path):
    hf = tiny_hf_model("llama", vocab_size=256, dtype=torch.float32)
    hf.save_pretrained(tmp_path / "hf")
    to_hf_tokenizer(ByteTokenizer()).save_pretrained(tmp_path / "hf")
    step = import_llama(tmp_path / "hf", tmp_path / "run")
    pre = load_pretrained(tmp_path / "run")
    assert pre.path == step and pre.tokenizer.encode("ab c").tolist() == [97, 98, 32, 99]
    ids = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        expected = hf(ids).logits
        assert rel_err(pre.model(ids), expected) < 1e-5
        back = AutoModelForCausalLM.from_pretrained(export_checkpoint(tmp_path / "run", tmp_path / "hf-again")).eval()
        assert rel_err(back(ids).logits, expected) < 1e-5


def test_architectures_that_differ_are_refused_with_the_reason(tmp_path):
    cases = [
        (tiny_hf_model("qwen2"), "only Llama-architecture"),
        (tiny_hf_model("llama", attention_bias=True), "biases"),
        (tiny_hf_model("llama", hidden_act="gelu"), "activation"),
        (tiny_hf_model("llama", rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
         "partial_rotary_factor"),
        (tiny_hf_model("mistral", sliding_window=8), "sliding window"),
        (tiny_hf_model("llama", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}), "scaled RoPE"),
    ]
    for model, reason in cases:
        with pytest.raises(SpeedlmError, match=reason):
            from_llama(model)
    tiny_hf_model("llama").save_pretrained(tmp_path / "no-tokenizer")
    with pytest.raises(SpeedlmError, match="tokenizer.json"):
        import_llama(tmp_path / "no-tokenizer", tmp_path / "run")
