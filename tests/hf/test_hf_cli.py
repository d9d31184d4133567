"""`speedlm hf export | import | eval` end to end on a trained checkpoint, and their errors."""

import json

import pytest

pytest.importorskip("transformers")

import support.hf_models  # noqa: E402,F401  (quiet transformers logging)

from speedlm.cli import main  # noqa: E402

TRAIN_FAST = ["--steps", "4", "--batch-size", "2", "--seq-len", "32", "--eval-every", "4", "--eval-batches", "1",
              "--warmup-steps", "1", "--save-every", "4"]


def last_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("speedlm: error:"), err
    return err[0]


def test_export_eval_and_import_from_the_command_line(corpus_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(corpus_dir), "--out", str(run), *TRAIN_FAST]) == 0
    assert main(["hf", "export", "--checkpoint", str(run), "--out", str(tmp_path / "llama"), "--format", "llama"]) == 0
    capsys.readouterr()
    rows_file = tmp_path / "rows.jsonl"
    assert main(["hf", "eval", "--model", str(tmp_path / "llama"), "--data", str(corpus_dir), "--tokens", "300",
                 "--window", "32", "--chunk", "16", "--out", str(rows_file)]) == 0
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert [r["attention"] for r in rows] == ["full", "sepllm"]
    assert rows[1]["tokens"] == 299 and 0 < rows[1]["kv_ratio"] < 1 and rows[1]["nll"] > 0
    assert main(["hf", "import", "--model", str(tmp_path / "llama"), "--out", str(tmp_path / "back")]) == 0
    assert main(["eval", "--checkpoint", str(tmp_path / "back"), "--data", str(corpus_dir), "--batches", "1", "--seq-len", "32"]) == 0
    assert main(["hf", "export", "--checkpoint", str(run), "--out", str(tmp_path / "any")]) == 0


def test_hf_commands_fail_with_one_line(tmp_path, capsys):
    assert main(["hf", "export", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "no checkpoint" in last_error(capsys)
    assert main(["hf", "eval", "--model", str(tmp_path)]) == 2
    assert "not a Hugging Face model folder" in last_error(capsys)
    assert main(["hf", "import", "--model", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "tokenizer.json" in last_error(capsys)
