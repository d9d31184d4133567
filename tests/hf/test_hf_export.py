"""speedlm checkpoints as Hugging Face model folders (speedlm/hf/export.py, modeling.py,
tokenizer.py): loaded by the Auto classes without remote code, same logits, same greedy tokens."""

import pytest
import torch

pytest.importorskip("transformers")

from support.hf_models import rel_err  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from speedlm.data.tokenizers import ByteTokenizer, train_bpe  # noqa: E402
from speedlm.errors import SpeedlmError  # noqa: E402
from speedlm.generate.loop import generate  # noqa: E402
from speedlm.hf import SpeedlmForCausalLM, export_checkpoint, to_hf_model, to_hf_tokenizer  # noqa: E402
from speedlm.models import PRESETS, build_model, preset_config  # noqa: E402
from speedlm.train.checkpoint import save_checkpoint  # noqa: E402

AR_PRESETS = [name for name in PRESETS if preset_config(f"{name}-tiny").objective == "ar"]
TEXT = "def main(x):\n    return x, 'héllo wörld' + \"世界\"  # ok?\n\tdone!\n"


@pytest.mark.parametrize("preset", AR_PRESETS)
def test_every_preset_round_trips_through_a_hugging_face_folder(preset, tmp_path):
    model = build_model(preset_config(f"{preset}-tiny")).eval()
    to_hf_model(model).save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # no trust_remote_code
    assert isinstance(loaded, SpeedlmForCausalLM)
    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids))  # buffers too (RetNet's decays)
        tokens = loaded.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(tokens, generate(model, ids, 6).ids)


def _checkpoint(tmp_path, tokenizer, preset="transformer-tiny"):
    config = preset_config(preset, vocab_size=tokenizer.vocab_size)
    model = build_model(config)
    run = tmp_path / "run"
    save_checkpoint(run, 5, model, trainer_state={"tokenizer": tokenizer.spec()}, extra_files_writer=tokenizer.save)
    return run, model.eval()


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_exported_checkpoint_loads_with_its_tokenizer_and_generates_the_same_tokens(kind, tmp_path, corpus_dir):
    from speedlm.data.corpus import load_corpus

    tokenizer = ByteTokenizer() if kind == "byte" else train_bpe(load_corpus(str(corpus_dir)), 300, tmp_path / "cache")
    run, model = _checkpoint(tmp_path, tokenizer, "sepllm-tiny")
    out = export_checkpoint(run, tmp_path / "hf")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    hf_model = AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = AutoTokenizer.from_pretrained(out)
    ids = hf_tok(TEXT, return_tensors="pt").input_ids
    assert ids[0].tolist() == tokenizer.encode(TEXT).tolist()
    assert hf_tok.decode(ids[0]) == tokenizer.decode(ids[0].numpy()) == TEXT
    with torch.no_grad():
        tokens = hf_model.generate(ids, max_new_tokens=12, do_sample=False)
        out_hf = hf_model(ids, labels=ids)
    assert torch.equal(tokens, generate(model, ids, 12).ids)
    expected = model.loss(ids[:, :-1], ids[:, 1:]).parts["lm"]
    assert rel_err(out_hf.loss, expected) < 1e-6


def test_export_refuses_a_folder_in_use_and_hf_models_refuse_what_speedlm_cannot_do(tmp_path):
    run, _ = _checkpoint(tmp_path, ByteTokenizer())
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep me")
    with pytest.raises(SpeedlmError, match="not empty"):
        export_checkpoint(run, tmp_path / "taken")
    with pytest.raises(SpeedlmError, match="no checkpoint"):
        export_checkpoint(tmp_path / "missing", tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(export_checkpoint(run, tmp_path / "hf"))
    ids = torch.randint(0, 256, (2, 5))
    with pytest.raises(SpeedlmError, match="padded"):
        model(ids, attention_mask=torch.tensor([[0, 1, 1, 1, 1], [1] * 5]))
    with pytest.raises(SpeedlmError, match="beam search"):
        model.generate(ids, max_new_tokens=2, num_beams=2, do_sample=False)


def test_byte_tokenizer_as_a_fast_tokenizer_keeps_every_byte():
    tok = to_hf_tokenizer(ByteTokenizer())
    text = "".join(map(chr, range(1, 128))) + "ÿ€𝄞"
    assert tok(text).input_ids == list(text.encode("utf-8"))
    assert tok.decode(list(text.encode("utf-8"))) == text


@pytest.mark.parametrize("preset", ["transformer-tiny", "gqa-tiny", "mqa-tiny"])
def test_full_attention_transformers_export_as_plain_llama(preset, tmp_path):
    from transformers import LlamaForCausalLM

    tokenizer = ByteTokenizer()
    run, model = _checkpoint(tmp_path, tokenizer, preset)
    out = export_checkpoint(run, tmp_path / "llama", format="llama")
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(loaded) is LlamaForCausalLM  # plain transformers: no speedlm class involved
    ids = AutoTokenizer.from_pretrained(out)(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        assert rel_err(loaded(ids).logits, model(ids)) < 1e-5  # float32 RoPE angles in transformers
        tokens = loaded.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(tokens, generate(model, ids, 12).ids)


def test_only_llama_layers_export_as_llama(tmp_path):
    run, _ = _checkpoint(tmp_path, ByteTokenizer(), "mamba-tiny")
    with pytest.raises(SpeedlmError, match="not a Llama layer"):
        export_checkpoint(run, tmp_path / "out", format="llama")
    with pytest.raises(SpeedlmError, match="unknown export format"):
        export_checkpoint(run, tmp_path / "out", format="gguf")
