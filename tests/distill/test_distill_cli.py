"""`speedlm distill`: the student checkpoint (`--stages none`), the two training stages with
their report, resume and reuse, and bad input refused in one line with exit code 2 and nothing
written."""

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
    _refused(capsys, tmp_path, "--teacher", t, "--replace", "1=gla", "--out", out, "--stages", "nothing",
             says="--stages takes none, transfer, distill or transfer,distill")
    _refused(capsys, tmp_path, "--teacher", t, "--replace", "1=gla", "--out", out, "--stages", "transfer,lora",
             says="unknown stage 'lora'")
    _refused(capsys, tmp_path, "--teacher", t, "--replace", "1=gla", "--out", out, "--stages", "distill,transfer",
             says="in that order")
    _refused(capsys, tmp_path, "--teacher", t, "--replace", "1=gla", "--out", out, "--train", "bogus",
             says="--train 'bogus'")
    _refused(capsys, tmp_path, "--teacher", t, "--replace", "1=gla", "--out", out, "--train", "lora",
             "--lora-rank", "0", says="--lora-rank must be >= 1")
    _refused(capsys, tmp_path, "--teacher", t, "--out", out, "--stages", "none", says="give --replace")
    _refused(capsys, tmp_path, "--teacher", str(tmp_path / "nowhere"), "--replace", "1=gla", "--out", out,
             "--stages", "none", says="no checkpoint at")


def _distill(tmp_path, corpus_dir, *more):
    return main(["distill", "--teacher", str(tmp_path / "teacher"), "--replace", "1=gated_deltanet",
                 "--out", str(tmp_path / "student"), "--data", str(corpus_dir), "--tokens", "2048",
                 "--batch-size", "4", "--seq-len", "32", "--lr", "3e-3", "--eval-batches", "2", "--device", "cpu",
                 *more])


def test_distill_trains_both_stages_resumes_and_the_student_evaluates(tmp_path, corpus_dir, capsys):
    import json

    save_teacher(tmp_path / "teacher")
    assert _distill(tmp_path, corpus_dir, "--stages", "transfer,distill") == 0
    out = tmp_path / "student"
    report = json.loads((out / "distill_report.json").read_text())
    assert [r["layer"] for r in report["layers"]] == [1] and report["layers"][0]["init"] == "from attention"
    transfer, distill = report["stages"]
    assert transfer["stage"] == "transfer" and distill["stage"] == "distill" and transfer["steps"] == 16
    assert transfer["end"]["mse_layer1"] < transfer["start"]["mse_layer1"]
    assert set(distill["end"]) == {"total", "kl", "lm"}
    assert set(report["validation"]) == {"student", "teacher", "tokens", "seq_len"}
    for stage in ("stage1-transfer", "stage2-distill"):
        assert (out / stage / "metrics.jsonl").is_file() and (out / stage / "latest").exists()
    said = capsys.readouterr().out
    assert "transfer: mse_layer1" in said and "distill: kl" in said and "validation loss" in said

    student = load_pretrained(out)
    assert student.tokenizer.spec() == ByteTokenizer().spec()
    assert [s["mixer"]["name"] for s in student.model.config.layer_specs()][:2] == ["attention", "gated_deltanet"]
    assert main(["eval", "--checkpoint", str(out), "--batches", "2", "--batch-size", "2", "--device", "cpu"]) == 0
    assert "val loss" in capsys.readouterr().out

    # the same command again: nothing is trained, the student is the one already there
    weights = {k: v.clone() for k, v in student.model.state_dict().items()}
    assert _distill(tmp_path, corpus_dir, "--stages", "transfer,distill") == 0
    assert "already holds this command's student" in capsys.readouterr().out
    again = load_pretrained(out).model.state_dict()
    assert all(torch.equal(again[k], v) for k, v in weights.items())


def test_a_rerun_skips_finished_stages(tmp_path, corpus_dir, capsys):
    """Stage 1 finished in a run that stopped before stage 2: the rerun loads it and trains stage 2."""
    import shutil

    save_teacher(tmp_path / "teacher")
    assert _distill(tmp_path, corpus_dir, "--stages", "transfer,distill", "--tokens", "512") == 0
    out = tmp_path / "student"
    for p in [*out.glob("step_*"), out / "latest", out / "distill_report.json", out / "stage2-distill"]:
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    capsys.readouterr()
    assert _distill(tmp_path, corpus_dir, "--stages", "transfer,distill", "--tokens", "512") == 0
    said = capsys.readouterr().out
    assert "transfer: finished in" in said and "distill: 4 steps" in said


def test_an_interrupted_stage_resumes_from_its_checkpoint_to_the_same_student(tmp_path, corpus_dir, capsys):
    """A stage stopped after its step-2 checkpoint: the rerun continues from it (the trainer's exact
    resume) and ends with the weights of the run that was never stopped."""
    import shutil

    save_teacher(tmp_path / "teacher")
    whole, cut = tmp_path / "whole", tmp_path / "student"
    args = ("--stages", "transfer", "--tokens", "512", "--save-every", "2")
    assert _distill(tmp_path, corpus_dir, *args, "--out", str(whole)) == 0
    assert _distill(tmp_path, corpus_dir, *args) == 0
    stage = cut / "stage1-transfer"
    for p in [*cut.glob("step_*"), stage / "step_0000004"]:
        shutil.rmtree(p)
    for p in (cut / "latest", cut / "distill_report.json"):
        p.unlink()
    (stage / "latest").write_text("step_0000002")
    capsys.readouterr()
    assert _distill(tmp_path, corpus_dir, *args) == 0
    assert "(resumed)" in capsys.readouterr().out
    a, b = load_pretrained(whole).model.state_dict(), load_pretrained(cut).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_imported_hugging_face_llama_distils_end_to_end(tmp_path, corpus_dir, capsys):
    """A tiny random `LlamaForCausalLM` through `speedlm hf import`, then both stages: the
    student keeps Llama's imported weights outside the replaced layer and starts that layer from
    its attention."""
    import json

    import pytest

    pytest.importorskip("transformers")
    from support.hf_models import import_through_cli, tiny_hf_model

    hf = tiny_hf_model("llama", dtype=torch.float32, vocab_size=256, num_hidden_layers=2)
    pre = import_through_cli(hf, tmp_path)  # writes tmp_path / "run"
    out = tmp_path / "student"
    assert main(["distill", "--teacher", str(tmp_path / "run"), "--replace", "odd=gated_deltanet", "--out", str(out),
                 "--data", str(corpus_dir), "--tokens", "1024", "--batch-size", "4", "--seq-len", "32",
                 "--eval-batches", "2", "--device", "cpu"]) == 0
    report = json.loads((out / "distill_report.json").read_text())
    assert report["layers"][0]["init"] == "from attention"
    assert [s["stage"] for s in report["stages"]] == ["transfer", "distill"]
    student = load_pretrained(out).model
    assert [s["mixer"]["name"] for s in student.config.layer_specs()] == ["attention", "gated_deltanet"]
    # before training: Llama's imported weights, its layer-1 attention as the new mixer's projections
    assert main(["distill", "--teacher", str(tmp_path / "run"), "--replace", "odd=gated_deltanet",
                 "--out", str(tmp_path / "init"), "--stages", "none"]) == 0
    init, teacher = load_pretrained(tmp_path / "init").model.state_dict(), pre.model.state_dict()
    for name, weight in teacher.items():
        if not name.startswith("blocks.1.mixer."):
            assert torch.equal(init[name], weight), name
    assert torch.equal(init["blocks.1.mixer.q_proj.weight"], teacher["blocks.1.mixer.q_proj.weight"])
    assert torch.equal(init["blocks.1.mixer.o_proj.weight"], teacher["blocks.1.mixer.o_proj.weight"])
    # the Hugging Face folder itself as --teacher: converted into --out/teacher, the same student
    capsys.readouterr()
    direct = tmp_path / "direct"
    assert main(["distill", "--teacher", str(tmp_path / "hf"), "--replace", "odd=gated_deltanet",
                 "--out", str(direct), "--stages", "none"]) == 0
    assert "converted to" in capsys.readouterr().out
    converted = load_pretrained(direct / "teacher")
    assert converted.trainer_state["imported_from"] == str(tmp_path / "hf")
    assert converted.tokenizer.spec() == pre.tokenizer.spec()
    for name, weight in load_pretrained(direct).model.state_dict().items():
        assert torch.equal(weight, init[name]), name
    assert main(["distill", "--teacher", str(tmp_path / "hf"), "--replace", "odd=gated_deltanet",
                 "--out", str(direct), "--stages", "none"]) == 0  # a rerun reuses the conversion and the student
    assert "converted to" not in capsys.readouterr().out
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    assert main(["distill", "--teacher", str(bare), "--replace", "1=gla", "--out", str(tmp_path / "x"),
                 "--stages", "none"]) == 2
    assert "has no tokenizer.json" in capsys.readouterr().err and not (tmp_path / "x").exists()
    capsys.readouterr()
