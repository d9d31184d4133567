"""LoRA adapters on the kept layers (distill/lora.py, `speedlm distill --train lora`): they start
at zero (the student is unchanged), only they and the new mixers train, and merging folds them
into the weights exactly, leaving a plain student of its own config."""

from __future__ import annotations

import json

import torch

from speedlm.checkpoint import load_pretrained
from speedlm.cli import main
from speedlm.distill.lora import add_lora, kept_linears, merge_lora
from speedlm.models.build import build_model
from speedlm.models.config import ModelConfig

from distill.test_distill_cli import save_teacher


def _model():
    torch.manual_seed(0)
    return build_model(ModelConfig(vocab_size=61, d_model=32, n_layers=3, n_heads=4)).double().eval()


def test_adapters_start_at_zero_and_merge_exactly():
    model = _model()
    ids = torch.randint(0, 61, (2, 17), generator=torch.Generator().manual_seed(1))
    before = model(ids)
    names = add_lora(model, new_layers=[1], rank=4, alpha=8.0)
    assert names and all(not n.startswith("blocks.1.") for n in names)
    assert len(names) == len(kept_linears(model, [1])) and any(n.startswith("blocks.2.") for n in names)
    assert torch.equal(model(ids), before)  # B = 0: exactly the model it was
    for m in model.modules():  # trained adapters
        if hasattr(m, "B") and hasattr(m, "A"):
            m.B.data.normal_(0, 0.1)
    adapted = model(ids)
    assert (adapted - before).abs().max() > 1e-3
    assert merge_lora(model) == len(names)
    assert not any("parametrizations" in k for k in model.state_dict())
    assert set(model.state_dict()) == set(_model().state_dict())  # a plain model of the same config
    torch.testing.assert_close(model(ids), adapted, rtol=1e-12, atol=1e-12)


def test_distill_with_lora_trains_adapters_and_new_mixers_only(tmp_path, corpus_dir):
    teacher = save_teacher(tmp_path / "teacher")
    out = tmp_path / "student"
    assert main(["distill", "--teacher", str(tmp_path / "teacher"), "--replace", "1=gated_deltanet", "--out", str(out),
                 "--stages", "distill", "--train", "lora", "--lora-rank", "2", "--data", str(corpus_dir),
                 "--tokens", "1024", "--batch-size", "4", "--seq-len", "32", "--lr", "3e-3", "--eval-batches", "2",
                 "--device", "cpu"]) == 0
    student = load_pretrained(out).model
    t, s = teacher.state_dict(), student.state_dict()
    assert set(s) == set(build_model(student.config).state_dict())  # merged: no adapter keys left
    # the kept layers' linear weights moved (their adapters, merged); their norms and the embeddings did not
    assert not torch.equal(s["blocks.0.mixer.q_proj.weight"], t["blocks.0.mixer.q_proj.weight"])
    ffn = [k for k in t if k.startswith("blocks.2.ffn.") and k.endswith("weight")]
    assert ffn and all(not torch.equal(s[k], t[k]) for k in ffn)
    frozen = [k for k in t if not k.startswith("blocks.") or "norm" in k]
    assert frozen and all(torch.equal(s[k], t[k]) for k in frozen if not k.startswith("blocks.1.mixer."))
    # a low-rank change: each kept weight moved by rank 2 (above float32's rounding of the merge)
    for k in ("blocks.0.mixer.q_proj.weight", ffn[0]):
        sv = torch.linalg.svdvals((s[k] - t[k]).double())
        assert sv[1] > 1e-3 * sv[0] and sv[2] < 1e-4 * sv[0], (k, sv[:4])
    record = json.loads((out / "distill_report.json").read_text())
    assert record["stages"][0]["end"]["kl"] != record["stages"][0]["start"]["kl"]
