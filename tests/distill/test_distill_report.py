"""`speedlm distill --scratch --baseline SPEC --report`: the from-scratch twin trains the
student's architecture from its own init on as many tokens as the stages, with the teacher's
recipe; the baselines are training-free students; the report is compare's (every entry a
checkpoint, measured as saved, zero-shot MQAR included) plus the distillation section and plot;
a rerun reuses everything; bad combinations are refused in one line."""

from __future__ import annotations

import json

import torch

from speedlm.checkpoint import load_pretrained
from speedlm.cli import main

from distill.test_distill_cli import save_teacher


def _run(tmp_path, corpus_dir, *more):
    return main(["distill", "--teacher", str(tmp_path / "teacher"), "--replace", "1=gated_deltanet",
                 "--out", str(tmp_path / "student"), "--data", str(corpus_dir), "--tokens", "1024",
                 "--batch-size", "4", "--seq-len", "32", "--lr", "3e-3", "--eval-batches", "2", "--device", "cpu",
                 "--contexts", "32,64", "--decode-tokens", "2", *more])


def test_scratch_twin_baselines_and_the_report(tmp_path, corpus_dir, capsys):
    save_teacher(tmp_path / "teacher")
    more = ["--scratch", "--report", "--baseline", 'all=sliding_window{"window": 8}', "--baseline", "1,3=sepllm"]
    assert _run(tmp_path, corpus_dir, *more) == 0
    out = tmp_path / "student"
    record = json.loads((out / "distill_report.json").read_text())
    stage_steps = sum(s["steps"] for s in record["stages"])
    scratch = record["scratch"]
    assert scratch["steps"] == stage_steps == 2 * 8 and scratch["tokens"] == 2 * 1024
    # the twin: the student's architecture, not its weights, trained on the same tokens
    student, twin = load_pretrained(out), load_pretrained(out / "scratch")
    assert twin.model.config.to_dict() == student.model.config.to_dict()
    assert twin.trainer_state["step"] == stage_steps
    assert not torch.equal(twin.model.blocks[0].mixer.q_proj.weight, student.model.blocks[0].mixer.q_proj.weight)
    assert twin.trainer_state["train_config"]["lr"] == 1e-3  # the teacher's recipe (TrainConfig's default here)

    report = json.loads((out / "report" / "report.json").read_text())
    names = [m["name"] for m in report["models"]]
    assert len(names) == 5 and names[0] == str(tmp_path / "teacher" / "step_0000000")
    assert names[2] == str(out / "scratch")
    assert all(m["status"] == "ok" and m["pretrained"] for m in report["models"]), report["models"]
    assert all("mqar_zero_shot" in m and set(m["decode_ms"]) == {"32", "64"} for m in report["models"])
    baselines = [load_pretrained(n).model for n in names[3:]]
    assert [s["mixer"]["name"] for s in baselines[0].config.layer_specs()] == ["sliding_window"] * 4
    assert [s["mixer"]["name"] for s in baselines[1].config.layer_specs()] == ["attention", "sepllm"] * 2
    # the windowed baseline holds a bounded cache: less than the teacher's at the longest context
    rows = {m["name"]: m for m in report["models"]}
    assert rows[names[3]]["cache_bytes"]["64"] < rows[names[0]]["cache_bytes"]["64"]

    section = report["distill"]
    assert [s["name"] for s in section["students"]] == names[1:2] + names[3:]
    assert section["scratch"][0]["val_loss"] == scratch["val_loss"]
    md = (out / "report" / "report.md").read_text()
    assert md.count("## Distillation") == 1 and "distill.png" in md and (out / "report" / "distill.png").is_file()
    assert "transfer: mse_layer1" in md and f"{scratch['val_loss']:.4f}" in md

    # a rerun reuses the student, the twin, the baselines and compare's stages
    capsys.readouterr()
    assert _run(tmp_path, corpus_dir, *more) == 0
    said = capsys.readouterr().out
    assert "already holds this command's student" in said and "from scratch: finished" in said
    again = json.loads((out / "report" / "report.json").read_text())
    assert [m["val_loss"] for m in again["models"]] == [m["val_loss"] for m in report["models"]]
    assert (out / "report" / "report.md").read_text().count("## Distillation") == 1


def test_bad_combinations_are_one_line_and_write_nothing(tmp_path, corpus_dir, capsys):
    save_teacher(tmp_path / "teacher")
    for more, says in ((["--stages", "none", "--scratch"], "--stages none has none"),
                       (["--baseline", "all=sliding_window"], "give --report too"),
                       (["--report", "--compare-with", str(tmp_path / "nowhere")], "not a checkpoint folder"),
                       (["--report", "--baseline", "9=sliding_window"], "layer 9 is out of range")):
        assert _run(tmp_path, corpus_dir, *more) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1, err
        assert not (tmp_path / "student").exists()
