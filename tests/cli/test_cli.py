"""The command line end to end, and its promise on bad input: one line naming the problem,
exit code 2, no traceback, nothing lost."""

import json
import re
import subprocess
import sys

import pytest

from speedlm.cli import main
from speedlm.models import preset_config

TRAIN_FAST = ["--steps", "6", "--batch-size", "2", "--seq-len", "32", "--eval-every", "3", "--eval-batches", "2",
              "--warmup-steps", "2", "--save-every", "3"]


@pytest.fixture(scope="module")
def trained(corpus_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    assert main(["train", "--data", str(corpus_dir), "--out", str(out), *TRAIN_FAST]) == 0
    return out


def one_error_line(capsys, needle):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("speedlm: error:") and needle in err[0], err[0]


def test_train_writes_checkpoint_metrics_and_plot(trained):
    latest = (trained / "latest").read_text().strip()
    assert latest == "step_0000006"
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in records)
    assert (trained / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = json.loads((trained / latest / "trainer_state.json").read_text())
    assert state["tokenizer"]["kind"] == "byte" and state["data"]["fingerprint"]


def test_resume_continues_to_more_steps(trained, corpus_dir, capsys):
    args = ["train", "--data", str(corpus_dir), "--out", str(trained), *TRAIN_FAST]
    args[args.index("--steps") + 1] = "9"
    # the schedule spans --steps, so a resumed run must keep it: continuing a 6-step run to
    # 9 steps is a new schedule, which resume allows with a warning
    assert main(args + ["--resume"]) == 0
    assert (trained / "latest").read_text().strip() == "step_0000009"


def test_eval_and_generate(trained, capsys):
    assert main(["eval", "--checkpoint", str(trained), "--batches", "2", "--seq-len", "32"]) == 0
    assert "perplexity" in capsys.readouterr().out
    assert main(["generate", "--checkpoint", str(trained), "--prompt", "def f", "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("def f") and "tokens/s" in out


def test_list_names_every_preset_with_its_paper(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("transformer", "gqa", "mqa", "sliding-window", "linear-attention", "arXiv"):
        assert name in out


def test_unknown_preset(capsys, tmp_path):
    assert main(["train", "--preset", "gtp", "--out", str(tmp_path / "o")]) == 2
    one_error_line(capsys, "unknown preset 'gtp'")


def test_invalid_pattern(capsys, tmp_path):
    cfg = preset_config("transformer").to_dict()
    cfg["pattern"] = "AZ"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(cfg))
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "o")]) == 2
    one_error_line(capsys, "pattern letters ['Z']")


def test_mismatched_vocabulary(capsys, tmp_path, corpus_dir):
    path = tmp_path / "v.json"
    path.write_text(preset_config("transformer", vocab_size=300).to_json())
    assert main(["train", "--config", str(path), "--data", str(corpus_dir), "--out", str(tmp_path / "o"), *TRAIN_FAST]) == 2
    one_error_line(capsys, "mismatched vocabulary")


def test_missing_checkpoint(capsys, tmp_path):
    assert main(["eval", "--checkpoint", str(tmp_path / "nothing")]) == 2
    one_error_line(capsys, "no checkpoint")


def test_corrupt_checkpoint(capsys, trained, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(trained / (trained / "latest").read_text().strip(), broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert main(["generate", "--checkpoint", str(broken)]) == 2
    one_error_line(capsys, "model.safetensors")


def test_empty_data(capsys, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "empty.txt").write_text("")
    assert main(["train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o")]) == 2
    one_error_line(capsys, "empty")


def test_sequence_longer_than_the_model_allows(capsys, tmp_path, trained):
    assert main(["train", "--seq-len", "100000", "--out", str(tmp_path / "o")]) == 2
    one_error_line(capsys, "max_seq_len")
    assert main(["generate", "--checkpoint", str(trained), "--max-new-tokens", "5000"]) == 2
    one_error_line(capsys, "max_seq_len")


def test_bad_bench_lengths(capsys):
    assert main(["bench", "speed", "--presets", "transformer-tiny", "--lengths", "0"]) == 2
    one_error_line(capsys, "length")


def test_real_process_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "speedlm", "eval", "--checkpoint", str(tmp_path / "missing")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


@pytest.mark.parametrize(
    "option,needle",
    [({"window": "abc"}, "option 'window' of mixer 'sliding_window' must be int, got 'abc'"),
     ({"window": 0}, "'window' of mixer 'sliding_window' must be >= 1")],
)
def test_bad_mixer_option_value_is_one_line(capsys, tmp_path, option, needle):
    cfg = preset_config("sliding-window").to_dict()
    cfg["layers"]["S"]["mixer"].update(option)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(cfg))
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "o")]) == 2
    one_error_line(capsys, needle)


def test_resume_reads_the_checkpoint_once(trained, corpus_dir, monkeypatch):
    import speedlm.checkpoint.files as files
    import speedlm.train.checkpoint as ckpt

    reads = []
    real = files.read_safetensors
    for module in (files, ckpt):
        monkeypatch.setattr(module, "read_safetensors", lambda path: reads.append(path.name) or real(path))
    args = ["train", "--data", str(corpus_dir), "--out", str(trained), *TRAIN_FAST]
    args[args.index("--steps") + 1] = "12"
    assert main(args + ["--resume"]) == 0
    assert sorted(reads) == ["model.safetensors", "optimizer.safetensors", "rng.safetensors"]


def test_eval_encodes_only_the_validation_split(trained, monkeypatch):
    import speedlm.data as data

    splits = []
    real = data.encode_split
    monkeypatch.setattr(data, "encode_split", lambda corpus, tok, split, *a: splits.append(split) or real(corpus, tok, split, *a))
    assert main(["eval", "--checkpoint", str(trained), "--batches", "1", "--seq-len", "32"]) == 0
    assert splits == ["val"]


def test_generate_does_not_read_training_state(trained, monkeypatch, capsys):
    import speedlm.checkpoint.files as files

    reads = []
    real = files.read_safetensors
    monkeypatch.setattr(files, "read_safetensors", lambda path: reads.append(path.name) or real(path))
    assert main(["generate", "--checkpoint", str(trained), "--prompt", "def", "--max-new-tokens", "3"]) == 0
    assert reads == ["model.safetensors"]  # no optimizer, no RNG state


def test_generate_streams_past_max_seq_len_under_attention_sinks(trained, capsys):
    """`--attention sink` on a full-attention checkpoint (trained at 32 tokens, max_seq_len from
    the preset): a bounded cache, so the length limit is lifted; the full cache keeps it."""
    args = ["generate", "--checkpoint", str(trained), "--prompt", "def", "--max-new-tokens", "600"]
    assert main(args) == 2
    one_error_line(capsys, "max_seq_len")
    assert main(args + ["--attention", "sink", "--window", "16", "--sinks", "2"]) == 0
    assert "cache" in capsys.readouterr().out


def test_train_records_the_tokenizer_separators_in_the_checkpoint(trained, corpus_dir, tmp_path):
    cfg = json.loads((trained / "step_0000006" / "config.json").read_text())
    assert cfg["separators"] == sorted(ord(c) for c in ".,?!;:\n\t ")  # the byte tokenizer's
    for spec, expected in (("., ", [32, 44, 46]), ("1,2", [1, 2])):
        out = tmp_path / spec.replace(" ", "_")
        args = ["train", "--data", str(corpus_dir), "--out", str(out), *TRAIN_FAST, "--separators", spec]
        args[args.index("--steps") + 1] = "1"
        assert main(args) == 0
        assert json.loads((out / "step_0000001" / "config.json").read_text())["separators"] == expected


def test_eval_under_sepllm_sink_and_window_reports_the_kv_ratio(trained, capsys):
    base = ["eval", "--checkpoint", str(trained), "--batches", "2", "--seq-len", "32"]
    assert main(base) == 0
    full = capsys.readouterr().out
    # a window as long as the sequence hides nothing: SepLLM's mask is then the causal one
    assert main(base + ["--attention", "sepllm", "--window", "32"]) == 0
    wide = capsys.readouterr().out
    assert full.split("perplexity")[1].split()[0] == wide.split("perplexity")[1].split()[0]
    assert "100.0% of the full cache on average" in wide
    for policy in ("sepllm", "sink", "window"):
        assert main(base + ["--attention", policy, "--window", "4"]) == 0
        out = capsys.readouterr().out
        ratio = float(out.split("KV cache ")[1].split("%")[0])
        assert 0 < ratio < 100 and "at peak" in out


def test_eval_and_generate_under_h2o_snapkv_and_kivi_report_the_cache_bytes(trained, capsys):
    base = ["eval", "--checkpoint", str(trained), "--batches", "2", "--seq-len", "32"]
    for extra in (["--attention", "h2o", "--window", "5", "--heavy", "4"],
                  ["--attention", "snapkv", "--window", "9", "--observe", "4"],
                  ["--attention", "kivi", "--bits", "2", "--group", "8", "--residual", "8"]):
        assert main(base + extra) == 0
        out = capsys.readouterr().out
        ratio = float(out.split("at peak, ")[1].split("%")[0])  # of the full cache's bytes at the end
        assert 0 < ratio < 60, out
    gen = ["generate", "--checkpoint", str(trained), "--prompt", "def f(x):", "--max-new-tokens", "20"]
    assert main(gen + ["--attention", "h2o", "--window", "5", "--heavy", "4"]) == 0
    assert capsys.readouterr().out.startswith("def f(x):")
    # impossible sizes: one line, exit 2
    assert main(base + ["--attention", "snapkv", "--window", "9", "--observe", "16"]) == 2
    one_error_line(capsys, "must exceed the observation window")
    assert main(base + ["--attention", "kivi", "--bits", "3"]) == 2
    one_error_line(capsys, "3-bit codes are not supported")


def test_generate_under_sepllm_training_free_and_streaming(trained, capsys):
    args = ["generate", "--checkpoint", str(trained), "--prompt", "def f(x):", "--max-new-tokens", "200"]
    # only "." as a separator: this model writes mostly spaces and newlines, every one of them
    # a separator by default
    assert main(args + ["--attention", "sepllm", "--window", "8", "--separators", "."]) == 0
    out = capsys.readouterr().out
    assert out.startswith("def f(x):")
    ratio, peak = map(float, re.search(r"KV ([\d.]+)% of the full cache on average, ([\d.]+)% at peak", out).groups())
    assert 0 < ratio < 100 and 0 < peak <= 100  # stale slots are evicted in batches: below the full cache
    args[args.index("--max-new-tokens") + 1] = "600"  # past max_seq_len: only the bounded streaming cache goes on
    assert main(args + ["--attention", "sepllm", "--window", "8"]) == 2
    one_error_line(capsys, "max_seq_len")
    assert main(args + ["--attention", "sepllm", "--window", "8", "--separator-cache", "8", "--cap", "40"]) == 0


def test_stream_writes_segments_summary_and_plot(trained, tmp_path, capsys):
    out = tmp_path / "stream"
    args = ["stream", "--checkpoint", str(trained), "--tokens", "900", "--segment", "300", "--chunk", "8",
            "--window", "16", "--separator-cache", "8", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "tokens/s" in printed
    records = [json.loads(line) for line in (out / "stream-sepllm.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in records] == [304, 608, 900]  # segments close on chunk ends
    assert all(r["kv_peak"] <= 4 + 8 + 16 + 256 for r in records)  # within the cap
    summary = json.loads((out / "stream-sepllm.json").read_text())
    assert summary["tokens"] == 900 and summary["kv_mean"] < 300
    assert (out / "stream-sepllm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(args + ["--policy", "sink"]) == 0
    assert json.loads((out / "stream-sink.json").read_text())["kv_peak"] <= 4 + 15
    # heavy hitters: a bounded cache of 8 + 15 keys per head, evicted after each chunk of 8
    assert main(args + ["--policy", "h2o", "--heavy", "8"]) == 0
    assert json.loads((out / "stream-h2o.json").read_text())["kv_peak"] <= 8 + 15 + 8


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["stream", "--policy", "full"], "bounded policy"),
        (["stream", "--tokens", "0"], "--tokens must be positive"),
        (["eval", "--attention", "sepllm", "--separators", "999"], "outside the vocabulary"),
        (["eval", "--attention", "sepllm", "--cap", "10"], "cap must be at least"),
    ],
)
def test_bad_policy_options_are_one_line_errors(trained, capsys, extra, needle):
    assert main([extra[0], "--checkpoint", str(trained), *extra[1:]]) == 2
    one_error_line(capsys, needle)


def test_segment_training_from_the_command_line_reports_the_reach(corpus_dir, tmp_path, capsys):
    out = tmp_path / "txl"
    args = ["train", "--preset", "transformer-xl-tiny", "--data", str(corpus_dir), "--out", str(out), "--segments", "2",
            *TRAIN_FAST]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "context reach 510 tokens" in printed  # 2 layers x (128 memory + 128 segment - 1)
    assert main([*args, "--activation-checkpointing", "--out", str(tmp_path / "x")]) == 2
    one_error_line(capsys, "activation checkpointing skips")


def test_diffusion_checkpoints_train_evaluate_as_a_bound_and_generate_in_parallel(corpus_dir, tmp_path, capsys, trained):
    out = tmp_path / "mdlm"
    assert main(["train", "--preset", "mdlm-tiny", "--data", str(corpus_dir), "--out", str(out), *TRAIN_FAST]) == 0
    assert "ppl <=" in capsys.readouterr().out
    assert main(["train", "--preset", "mdlm-tiny", "--data", str(corpus_dir), "--out", str(out), *TRAIN_FAST[:1], "9",
                 *TRAIN_FAST[2:], "--resume"]) == 0  # the same trainer resumes it
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out), "--batches", "2"]) == 0
    assert "(an upper bound, from the diffusion ELBO)" in capsys.readouterr().out
    assert main(["generate", "--checkpoint", str(out), "--prompt", "def ", "--max-new-tokens", "16", "--steps", "4",
                 "--block", "8"]) == 0
    assert "16 tokens in 4 denoising steps (4.00 tokens/step)" in capsys.readouterr().out
    assert main(["generate", "--checkpoint", str(out), "--max-new-tokens", "16", "--steps", "1", "--block", "8"]) == 2
    one_error_line(capsys, "fewer than the 2 blocks")
    assert main(["generate", "--checkpoint", str(trained), "--steps", "4"]) == 2
    one_error_line(capsys, "are for diffusion checkpoints")
    assert main(["generate", "--checkpoint", str(out), "--top-k", "5"]) == 2
    one_error_line(capsys, "--top-k: not for diffusion checkpoints")
    assert main(["eval", "--checkpoint", str(out), "--attention", "window", "--window", "8"]) == 2
    one_error_line(capsys, "this checkpoint (a diffusion LM) has none")
    assert main(["stream", "--checkpoint", str(out), "--policy", "window", "--tokens", "10"]) == 2
    one_error_line(capsys, "(a diffusion LM) has none")
    assert main(["train", "--preset", "mdlm-tiny", "--data", str(corpus_dir), "--out", str(tmp_path / "seg"), "--segments", "2",
                 *TRAIN_FAST]) == 2
    one_error_line(capsys, "some layers of this model have none")
    bench = tmp_path / "bench"
    assert main(["bench", "diffusion", "--checkpoint", str(out), "--judge", str(trained), "--length", "8", "--prompts", "2",
                 "--prompt-len", "8", "--out", str(bench)]) == 0
    rows = json.loads((bench / "bench_diffusion.json").read_text())["results"]
    assert [(r["model"], r["steps"]) for r in rows] == [("autoregressive", 8), ("diffusion", 8), ("diffusion", 4),
                                                         ("diffusion", 2), ("diffusion", 1)]
    assert all(r["judge_ppl"] > 1 and 0 < r["distinct"] <= 1 for r in rows) and (bench / "bench_diffusion.png").exists()
    capsys.readouterr()
    assert main(["bench", "diffusion", "--checkpoint", str(trained), "--judge", str(trained), "--out", str(bench)]) == 2
    one_error_line(capsys, "is not a diffusion checkpoint")


def test_generate_compile_prints_the_eager_text(trained, capsys):
    args = ["generate", "--checkpoint", str(trained), "--prompt", "def f", "--max-new-tokens", "16"]
    assert main(args) == 0
    eager = capsys.readouterr().out
    assert main([*args, "--compile"]) == 0
    compiled = capsys.readouterr().out
    assert compiled.split("\n[")[0] == eager.split("\n[")[0]  # the same text; the timing line differs
    assert "first steps compiling" in compiled and "first steps compiling" not in eager
