"""`speedlm distill --graft`: whole blocks of other checkpoints (same width, positions and
tokenizer) in the teacher's place, copied exactly, trainable by the stages; donors that differ
are refused in one line with exit code 2 and nothing written."""

from __future__ import annotations

import json

import pytest
import torch

from speedlm.checkpoint import load_pretrained
from speedlm.checkpoint.files import publish_step
from speedlm.cli import main
from speedlm.data.tokenizers import ByteTokenizer
from speedlm.distill.graft import parse_graft
from speedlm.errors import SpeedlmError
from speedlm.models.build import build_model
from speedlm.models.config import ModelConfig

from distill.test_distill_cli import save_teacher


def save_donor(folder, mixer="mamba2", seed=3, tokenizer=None, **fields):
    torch.manual_seed(seed)
    base = dict(vocab_size=256, d_model=32, n_layers=4, n_heads=4, layers={"M": {"mixer": {"name": mixer}}}, pattern="M")
    model = build_model(ModelConfig(**{**base, **fields}))
    tok = tokenizer or ByteTokenizer()
    publish_step(folder, 0, model, {"tokenizer": tok.spec()}, write_files=tok.save)
    return model


@pytest.mark.parametrize("spec, expected", [
    ("1,3=runs/h", [(1, "runs/h", 1), (3, "runs/h", 3)]),
    ("1,3=runs/h@0,2;0=/x/y", [(0, "/x/y", 0), (1, "runs/h", 0), (3, "runs/h", 2)]),
    ("odd=runs/h@0-1", [(1, "runs/h", 0), (3, "runs/h", 1)]),
])
def test_parse_graft(spec, expected):
    assert [(g.layer, g.donor, g.source) for g in parse_graft(spec, 4)] == expected


@pytest.mark.parametrize("spec, says", [
    ("", "--graft is empty"), ("1,3=runs/h@0", "2 student layer(s) but 1 source layer(s)"),
    ("4=runs/h", "layer 4 is out of range"), ("1=a;1=b", "layer 1 is grafted twice"), ("runs/h", "expected LAYERS="),
])
def test_parse_graft_refuses_in_one_line(spec, says):
    with pytest.raises(SpeedlmError) as e:
        parse_graft(spec, 4)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_grafted_layers_are_the_donors_blocks_and_train_in_stage_one(tmp_path, corpus_dir, capsys):
    teacher = save_teacher(tmp_path / "teacher")
    donor = save_donor(tmp_path / "donor")
    assert main(["distill", "--teacher", str(tmp_path / "teacher"), "--graft", f"1,3={tmp_path / 'donor'}@0,3",
                 "--replace", "2=gla", "--out", str(tmp_path / "student"), "--stages", "none"]) == 0
    said = capsys.readouterr().out
    assert "1 layer(s) replaced, 1 from attention, 2 grafted" in said
    student = load_pretrained(tmp_path / "student").model
    assert [s["mixer"]["name"] for s in student.config.layer_specs()] == ["attention", "mamba2", "gla", "mamba2"]
    for i, j in ((1, 0), (3, 3)):
        for k, v in donor.blocks[j].state_dict().items():
            assert torch.equal(student.blocks[i].state_dict()[k], v), (i, k)
    for k, v in teacher.blocks[0].state_dict().items():
        assert torch.equal(student.blocks[0].state_dict()[k], v), k
    outside = {k: v for k, v in teacher.state_dict().items() if not k.startswith("blocks.")}
    assert outside and all(torch.equal(student.state_dict()[k], v) for k, v in outside.items())  # embeddings, head
    record = json.loads((tmp_path / "student" / "distill_report.json").read_text())
    assert [r["init"] for r in record["layers"]] == [f"grafted from {tmp_path / 'donor'} layer 0", "from attention",
                                                     f"grafted from {tmp_path / 'donor'} layer 3"]

    # stage 1 on the grafted and replaced layers: each moves towards the teacher's layer output
    assert main(["distill", "--teacher", str(tmp_path / "teacher"), "--graft", f"1,3={tmp_path / 'donor'}@0,3",
                 "--replace", "2=gla", "--out", str(tmp_path / "trained"), "--stages", "transfer",
                 "--data", str(corpus_dir), "--tokens", "2048", "--batch-size", "4", "--seq-len", "32",
                 "--lr", "3e-3", "--eval-batches", "2", "--device", "cpu"]) == 0
    stage = json.loads((tmp_path / "trained" / "distill_report.json").read_text())["stages"][0]
    for i in (1, 2, 3):
        assert stage["end"][f"mse_layer{i}"] < stage["start"][f"mse_layer{i}"]


def _refused(capsys, tmp_path, graft, says, replace=None):
    argv = ["distill", "--teacher", str(tmp_path / "teacher"), "--graft", graft, "--out", str(tmp_path / "student"),
            "--stages", "none"] + (["--replace", replace] if replace else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1, err
    assert not (tmp_path / "student").exists()


def test_donors_that_do_not_fit_are_refused(tmp_path, capsys):
    from speedlm.data.corpus import Corpus
    from speedlm.data.tokenizers import train_bpe

    save_teacher(tmp_path / "teacher")
    save_donor(tmp_path / "wide", mixer="attention", d_model=48)
    save_donor(tmp_path / "heads", n_heads=2)
    save_donor(tmp_path / "theta", rope_theta=500.0)
    text = "".join(f"def f{i}(x): return x\n" for i in range(300))
    bpe = train_bpe(Corpus("t", text, text, "tbpe0000", 1), 256 + 20, cache_dir=tmp_path / "bpe")
    save_donor(tmp_path / "bpe", tokenizer=bpe, vocab_size=bpe.vocab_size)
    save_donor(tmp_path / "ok")
    _refused(capsys, tmp_path, f"1={tmp_path / 'wide'}", "its d_model is 48, the teacher's 32")
    _refused(capsys, tmp_path, f"1={tmp_path / 'heads'}", "its n_heads is 2, the teacher's 4")
    _refused(capsys, tmp_path, f"1={tmp_path / 'theta'}", "its rope_theta is 500.0")
    _refused(capsys, tmp_path, f"1={tmp_path / 'bpe'}", "its vocab_size is")
    _refused(capsys, tmp_path, f"1={tmp_path / 'ok'}@7", "layer 7 is out of range; it has 4 layers")
    _refused(capsys, tmp_path, f"1={tmp_path / 'nowhere'}", "--graft")
    _refused(capsys, tmp_path, f"1={tmp_path / 'ok'}", "layer 1 is both replaced and grafted", replace="1=gla")


def test_a_donor_with_another_tokenizer_of_the_same_size_is_refused(tmp_path, capsys):
    from speedlm.data.corpus import Corpus
    from speedlm.data.tokenizers import train_bpe

    def bpe(text, name):
        return train_bpe(Corpus(name, text, text, name + "0000", 1), 276, cache_dir=tmp_path / name)

    code = "".join(f"def f{i}(x): return x\n" for i in range(300))
    prose = "".join(f"the {i} cats sat on the mat and looked at the sky\n" for i in range(300))
    a, b = bpe(code, "code"), bpe(prose, "prose")
    assert a.vocab_size == b.vocab_size and a.spec() != b.spec()
    save_donor(tmp_path / "teacher", mixer="attention", tokenizer=a, vocab_size=a.vocab_size)
    save_donor(tmp_path / "other", tokenizer=b, vocab_size=b.vocab_size)
    _refused(capsys, tmp_path, f"1={tmp_path / 'other'}", "is not the teacher's")
