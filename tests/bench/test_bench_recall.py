"""`speedlm bench recall`: MQAR over presets x widths x lengths x pairs."""

import json

import pytest

from speedlm.bench.recall import (
    RecallSetting, chance_accuracy, learning_flag, recall_accuracy, recall_config, run_recall_bench, train_recall,
)
from speedlm.cli import main
from speedlm.errors import SpeedlmError
from speedlm.models import build_model


def test_the_sweep_writes_a_row_per_setting_and_skips_what_cannot_hold_the_pairs(tmp_path):
    result = run_recall_bench(["transformer-tiny", "linear-attention-tiny"], lengths=[16, 32], pairs=[2, 8], widths=[32],
                              steps=3, batch_size=4, vocab_size=32, test_examples=16, device="cpu",
                              out_dir=str(tmp_path), progress=False)
    rows = result["results"]
    # (16, 8) does not fit (needs length >= 32): 3 settings per preset
    assert sorted((r["preset"], r["seq_len"], r["pairs"]) for r in rows) == sorted(
        (p, n, k) for p in ("transformer-tiny", "linear-attention-tiny") for n, k in ((16, 2), (32, 2), (32, 8))
    )
    for r in rows:
        assert r["status"] == "ok" and 0.0 <= r["accuracy"] <= 1.0 and r["width"] == 32 and r["steps"] == 3
    attn = {r["seq_len"]: r["state_bytes"] for r in rows if r["preset"] == "transformer-tiny" and r["pairs"] == 2}
    lin = {r["seq_len"]: r["state_bytes"] for r in rows if r["preset"] == "linear-attention-tiny" and r["pairs"] == 2}
    assert attn[32] == 2 * attn[16] and lin[32] == lin[16]  # a KV cache grows, a recurrent state does not
    saved = json.loads((tmp_path / "bench_recall.json").read_text())
    assert len(saved["results"]) == 6 and "| transformer-tiny | 32 | 16 | 2 |" in (tmp_path / "bench_recall.md").read_text()
    assert (tmp_path / "bench_recall.png").stat().st_size > 1000
    assert not list(tmp_path.glob("**/step_*"))  # throw-away runs: no checkpoints


def test_accuracy_is_scored_on_held_out_examples():
    s = RecallSetting(seq_len=16, num_kv_pairs=2, vocab_size=16, test_examples=64)
    model = build_model(recall_config("transformer-tiny", s, 32))
    a, b = recall_accuracy(model, s, seed=0), recall_accuracy(model, s, seed=0)
    assert a == b and 0.0 <= a <= 1.0
    assert chance_accuracy(s) == 1 / 8


def test_widths_must_split_into_the_presets_heads():
    with pytest.raises(SpeedlmError, match="does not split into 4 heads"):
        recall_config("transformer-tiny", RecallSetting(), 36)


def test_heads_are_set_for_every_model_and_grouped_queries_never_outnumber_them():
    s = RecallSetting()
    one = recall_config("transformer-tiny", s, 32, heads=1)
    assert one.n_heads == 1 and one.d_model == 32 and recall_config("transformer-tiny", s, 32).n_heads == 4
    gqa = recall_config("gqa-tiny", s, 64, heads=2).to_dict()
    assert gqa["n_heads"] == 2 and gqa["layers"]["A"]["mixer"]["kv_heads"] <= 2
    build_model(recall_config("mqa-tiny", s, 32, heads=1))  # builds: the sharing fits the one head


def test_zoologys_zero_filler_leaves_only_pairs_and_queries():
    s = RecallSetting(seq_len=32, num_kv_pairs=3, vocab_size=32)
    import torch

    x, y = s.batch(16, torch.Generator().manual_seed(0))
    queries = y != -100
    assert (x[:, 6:][~queries[:, 6:]] == 0).all() and (x[:, :6] > 0).all()
    noisy, _ = RecallSetting(seq_len=32, num_kv_pairs=3, vocab_size=32, random_non_queries=True).batch(
        16, torch.Generator().manual_seed(0))
    assert (noisy[:, 6:] != 0).float().mean() > 0.5  # the generator's default: random tokens between queries


def test_a_solved_run_stops_at_the_checkpoint_that_scores_it():
    s = RecallSetting(seq_len=16, num_kv_pairs=2, vocab_size=16, steps=8, batch_size=4, test_examples=32)
    cfg = recall_config("transformer-tiny", s, 32, heads=1)
    run = train_recall(cfg, s, device="cpu", checkpoints=4, stop_at=1e-9)  # any score counts as solved
    assert run["solved_at"] == 2 and run["steps"] == 2 and run["curve"] == run["curve"][:1] and run["flag"] is None
    never = train_recall(cfg, s, device="cpu", checkpoints=4, stop_at=1.0 + 1e-9)
    assert never["solved_at"] is None and never["steps"] == 8 and len(never["curve"]) == 4
    with pytest.raises(SpeedlmError, match="needs checkpoints"):
        train_recall(cfg, s, device="cpu", stop_at=0.5)


def test_workers_give_the_runs_one_process_gives(tmp_path, monkeypatch):
    import torch

    kw = dict(presets=["transformer-tiny", "hgrn-tiny"], lengths=[16], pairs=[2], widths=[16, 32], steps=6,
              batch_size=4, vocab_size=16, test_examples=32, device="cpu", progress=False, lrs=[1e-3, 3e-3],
              checkpoints=3, heads=1)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # this process trains on 1 thread, as each of the 2 workers below does
    try:
        alone = run_recall_bench(**kw, out_dir=str(tmp_path / "one"))["results"]
        monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # 2 threads to share: 1 per worker
        pooled = run_recall_bench(**kw, out_dir=str(tmp_path / "two"), workers=2)["results"]
    finally:
        monkeypatch.undo()
        torch.set_num_threads(before)
    drop = {"train_tok_per_s"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in alone] == [
        {k: v for k, v in r.items() if k not in drop} for r in pooled]
    assert json.loads((tmp_path / "two" / "bench_recall.json").read_text())["meta"]["workers"] == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lengths", "8", "--pairs", "4"], "no length"),
        (["--presets", "nope"], "unknown preset"),
        (["--widths", "31"], "does not split"),
        (["--widths", "30", "--heads", "0"], "does not split into 4 heads"),
        (["--heads", "-1"], "heads"),
        (["--workers", "0"], "workers"),
        (["--stop-at", "1.5"], "stop_at must be an accuracy"),
        (["--stop-at", "0.9", "--checkpoints", "0"], "needs checkpoints"),
        (["--vocab-size", "8", "--pairs", "8"], "too few distinct keys"),
        (["--lrs", "1e-3,-1"], "learning rates must be positive"),
        (["--checkpoints", "-1"], "checkpoints"),
    ],
)
def test_bad_input_is_one_line(args, message, tmp_path, capsys):
    assert main(["bench", "recall", "--out", str(tmp_path), "--steps", "1", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_bench_peak_reports_the_peak_it_divides_by(capsys, monkeypatch):
    monkeypatch.setenv("SPEEDLM_PEAK_FLOPS", "3e11")
    assert main(["bench", "peak", "--dtypes", "float32", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "300.0 GFLOP/s (given)" in out and "float32" in out




def test_bench_ops_times_every_op_against_its_reference(tmp_path, capsys):
    assert main(["bench", "ops", "--lengths", "40", "--repeats", "1", "--device", "cpu", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench_ops.json").read_text())["results"]
    assert {r["op"] for r in rows} >= {"linear_attention", "gla (per-channel decay)", "delta rule", "hgrn", "performer (FAVOR+)"}
    assert all(r["naive_ms"] > 0 and r["fast_ms"] > 0 and r["speedup"] > 0 for r in rows)
    assert all(len(r["naive_samples_ms"]) == len(r["fast_samples_ms"]) == 1 for r in rows)


def test_the_learning_flag_tells_rising_and_plateaus_from_converged_runs():
    steps = [100 * i for i in range(1, 9)]
    assert learning_flag(list(zip(steps, [0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 0.97, 1.0]))) == "rising"
    assert learning_flag(list(zip(steps, [0.1, 0.2, 0.25, 0.25, 0.26, 0.25, 0.25, 0.26]))) == "plateau"
    assert learning_flag(list(zip(steps, [0.2, 0.6, 0.9, 0.98, 0.99, 1.0, 1.0, 1.0]))) is None  # solved
    assert learning_flag(list(zip(steps, [0.1, 0.3, 0.5, 0.55, 0.6, 0.62, 0.64, 0.66]))) is None  # slowing, not flat
    assert learning_flag([(1, 0.1), (2, 0.9)]) is None  # too short to tell
    noisy = list(zip(steps, [0.07, 0.21, 0.21, 0.23, 0.215, 0.236, 0.227, 0.225]))  # 0.021 apart: noise at 512 queries
    assert learning_flag(noisy) is None and learning_flag(noisy, queries=512) == "plateau"
    assert learning_flag(noisy, queries=100_000) is None  # that precise, 0.021 is not flat


def test_a_learning_curve_does_not_change_the_run():
    s = RecallSetting(seq_len=16, num_kv_pairs=2, vocab_size=16, steps=8, batch_size=4, test_examples=32)
    cfg = recall_config("transformer-tiny", s, 32)
    plain = train_recall(cfg, s, device="cpu")
    traced = train_recall(cfg, s, device="cpu", checkpoints=4)
    assert traced["accuracy"] == plain["accuracy"] and traced["final_loss"] == plain["final_loss"]
    assert [k for k, _ in traced["curve"]] == [2, 4, 6, 8] and "flag" in traced and "curve" not in plain


def test_each_setting_reports_its_best_learning_rate(tmp_path):
    result = run_recall_bench(["transformer-tiny"], lengths=[16], pairs=[2], widths=[32], steps=6, batch_size=4,
                              vocab_size=16, test_examples=16, device="cpu", out_dir=str(tmp_path), progress=False,
                              lrs=[1e-4, 3e-3], checkpoints=3)
    (row,) = result["results"]
    by_lr = {float(k): v for k, v in row["accuracy_by_lr"].items()}
    assert set(by_lr) == {1e-4, 3e-3}
    assert row["accuracy"] == max(by_lr.values()) and by_lr[row["lr"]] == row["accuracy"]
    assert len(row["curve"]) == 3
    assert "| best lr |" in (tmp_path / "bench_recall.md").read_text()


def test_rates_after_a_solved_run_are_skipped_and_said_so(tmp_path):
    result = run_recall_bench(["transformer-tiny"], lengths=[16], pairs=[2], widths=[32], steps=6, batch_size=4,
                              vocab_size=16, test_examples=16, device="cpu", out_dir=str(tmp_path), progress=False,
                              lrs=[1e-3, 3e-3], checkpoints=3, heads=1, stop_at=1e-9)
    (row,) = result["results"]
    assert row["lr"] == 1e-3 and row["solved_at"] == 2 and row["skipped_lrs"] == [3e-3]
    assert list(row["accuracy_by_lr"]) == ["0.001"]
    assert "0.003: skipped" in (tmp_path / "bench_recall.md").read_text()


def _children(pid: int) -> set[int]:
    """Linux: the processes whose parent is `pid` (from /proc)."""
    import os

    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.add(int(entry))
    return found


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_stop_when_the_benchmark_is_killed(tmp_path):
    """A `bench recall --workers 2` killed with SIGTERM leaves no training running."""
    import os
    import signal
    import subprocess
    import sys
    import time

    code = ("from speedlm.bench.recall import run_recall_bench; "
            f"run_recall_bench(['hgrn-tiny'], lengths=[16], pairs=[2], widths=[16, 32], steps=10**6, batch_size=2, "
            f"vocab_size=16, test_examples=8, device='cpu', out_dir={str(tmp_path)!r}, progress=False, "
            "checkpoints=0, heads=1, workers=2)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, workers = time.monotonic() + 120, set()
        while time.monotonic() < deadline and len(workers) < 2:
            time.sleep(0.5)
            workers = {p for p in _children(parent.pid) if "spawn_main" in open(f"/proc/{p}/cmdline").read()}
        assert len(workers) == 2, "the workers did not start"
        time.sleep(3)  # they may still be starting (a loaded machine): they must stop either way
        parent.send_signal(signal.SIGTERM)
        parent.wait(30)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") for p in workers):
            time.sleep(0.5)
        alive = [p for p in workers if os.path.exists(f"/proc/{p}")
                 and open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"]
        assert not alive, f"workers {alive} still run after their benchmark was killed"
    finally:
        if parent.poll() is None:
            parent.kill()
