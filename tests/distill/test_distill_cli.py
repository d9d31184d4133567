"""`speedlm distill --stages none`: the student checkpoint, and bad input refused in one line
with exit code 2 and nothing written."""

from __future__ import annotations

import torch

from speedlm.checkpoint import load_pretrained
from speedlm.checkpoint.files import publish_step
from speedlm.cli import main
from speedlm.data.tokenizers import ByteTokenizer
from speedlm.models.build import build_model
from speedlm.models.config import ModelConfig


def save_teacher(folder, tokenizer=True):
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=256, d_model=32, n_layers=4, n_heads=4,
                                    layers={"A": {"mixer": {"name": "attention", "kv_heads": 2}}}))
    tok = ByteTokenizer()
    state = {"tokenizer": tok.spec()} if tokenizer else {}
    publish_step(folder, 0, model, state, write_files=tok.save if tokenizer else None)
    return model.eval()


def test_distill_saves_the_student_with_the_teachers_tokenizer(tmp_path, capsys):
    teacher = save_teacher(tmp_path / "teacher")
    spec = '1,2=sliding_window{"window": 64};3=gated_deltanet'
    assert main(["distill", "--teacher", str(tmp_path / "teacher"), "--replace", spec,
                 "--out", str(tmp_path / "student"), "--stages", "none"]) == 0
    said = capsys.readouterr().out
    assert "layer 3: gated_deltanet, from attention" in said and "3 layer(s) replaced, 3 from attention" in said
    student = load_pretrained(tmp_path / "student")
    assert student.tokenizer.spec() == ByteTokenizer().spec()
    assert [s["mixer"]["name"] for s in student.model.config.layer_specs()] == \
        ["attention", "sliding_window", "sliding_window", "gated_deltanet"]
    assert [r["init"] for r in student.trainer_state["distill_report"]] == ["from attention"] * 3
    m, t = student.model, teacher
    for k, v in t.state_dict().items():  # everything but the replaced mixers, and the windows' q/k/v/o
        if not k.startswith("blocks.3.mixer."):
            assert torch.equal(m.state_dict()[k], v), k
    assert torch.equal(m.blocks[3].mixer.q_proj.weight, t.blocks[3].mixer.q_proj.weight)


def _refused(capsys, tmp_path, *argv, says):
    code = main(["distill", *argv])
    err = capsys.readouterr().err
    assert code == 2 and says in err and err.count("\n") == 1, err
    assert not (tmp_path / "student").exists()


def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys):
    save_teacher(tmp_path / "teacher")
    save_teacher(tmp_path / "bare", tokenizer=False)
    t, out = str(tmp_path / "teacher"), str(tmp_path / "student")
    _refused(capsys, tmp_path, "--teacher", t, "--replace", "4=gla", "--out", out, "--stages", "none",
             says="layer 4 is out of range; the teacher has 4 layers (0-3)")
    _refused(capsys, tmp_path, "--teacher", t, "--replace", "1=linformer", "--out", out, "--stages", "none",
             says="mixer 'linformer' cannot be causal")
    _refused(capsys, tmp_path, "--teacher", str(tmp_path / "bare"), "--replace", "1=gla", "--out", out,
             "--stages", "none", says="has no tokenizer")
    _refused(capsys, tmp_path, "--teacher", t, "--replace", "1=gla", "--out", out, "--stages", "transfer",
             says="only 'none'")
    _refused(capsys, tmp_path, "--teacher", str(tmp_path / "nowhere"), "--replace", "1=gla", "--out", out,
             "--stages", "none", says="no checkpoint at")
