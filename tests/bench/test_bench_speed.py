"""run_speed_bench end to end on tiny presets. No test asserts a timing value or a speed ratio."""

import json
import math
import statistics

import pytest
import torch

from speedlm.bench import run_speed_bench
from speedlm.bench.report import loglog_slope
from speedlm.errors import SpeedlmError
from speedlm.models import PRESETS, CausalLM, presets_for

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FAST = dict(repeats=1, warmup=0, decode_tokens=4, progress=False)
PAIR = ["transformer-tiny", "linear-attention-tiny"]


@pytest.fixture
def no_plots(monkeypatch):
    """Tests that are not about the plots skip drawing them (matplotlib costs ~1 s a run)."""
    import speedlm.bench.speed as speed

    monkeypatch.setattr(speed, "write_plots", lambda *a, **k: {})


@pytest.fixture(scope="module")
def pair_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = run_speed_bench(PAIR, [32, 64], out_dir=str(out), **FAST)
    return out, result


def test_json_has_every_preset_and_length(pair_run):
    out, result = pair_run
    data = json.loads((out / "bench_speed.json").read_text())
    assert {(r["preset"], r["length"]) for r in data["results"]} == {(p, n) for p in PAIR for n in (32, 64)}
    for r in data["results"]:
        assert r["params"] > 0 and r["gflop_per_token_fwd"] > 0 and r["state_bytes"] > 0
        for name in ("fwd", "fwd_bwd", "decode"):
            m = r["metrics"][name]
            assert m["status"] == "ok", m
            assert m["ms"] > 0 and all(s > 0 for s in m["samples_ms"])
            assert isinstance(m["peak_bytes"], int) and m["peak_bytes"] >= 0
    meta = data["meta"]
    assert meta["device"] == "cpu" and meta["dtype"] == "float32" and meta["batch_size"] == 1
    assert meta["torch_version"] == torch.__version__ and meta["date"]
    assert "profiler" in meta["memory_method"]
    assert data["baseline"] == PAIR[0]
    assert [e["length"] for e in data["ratios"][PAIR[1]]] == [32, 64]


def test_decode_latency_is_the_median_timed_step(tmp_path):
    """Per-token decode latency is the median of the single-token steps of the timed runs only
    (not the warm-up run, not the profiled memory run), so one preempted step cannot move it."""
    result = run_speed_bench(["transformer-tiny"], [16], repeats=3, warmup=1, decode_tokens=5, progress=False,
                             out_dir=str(tmp_path))
    m = result["results"][0]["metrics"]["decode"]
    assert len(m["step_ms"]) == 3 * 5
    assert m["ms"] == statistics.median(m["step_ms"])
    assert len(m["samples_ms"]) == 3


def test_exponents_present_and_finite(pair_run):
    _, result = pair_run
    for p in PAIR:
        e = result["exponents"][p]
        for group in ("time", "memory"):
            for metric in ("fwd", "fwd_bwd", "decode"):
                assert math.isfinite(e[group][metric]["all"]), (p, group, metric)
        assert math.isfinite(e["state_bytes"]["all"])
    # analytic state: O(T) KV cache vs O(1) recurrent state (exact, not a timing)
    assert result["exponents"]["transformer-tiny"]["state_bytes"]["all"] == pytest.approx(1.0)
    assert result["exponents"]["linear-attention-tiny"]["state_bytes"]["all"] == pytest.approx(0.0, abs=1e-9)


def test_markdown_and_pngs_written(pair_run, capsys):
    out, result = pair_run
    md = (out / "bench_speed.md").read_text()
    assert "| preset | length | fwd ms | fwd+bwd ms | decode ms/token |" in md
    assert "Scaling exponents" in md and "measured in one process" in md
    assert "memory: torch.profiler" in md
    for p in PAIR:
        assert f"| {p} | 32 |" in md and f"| {p} | 64 |" in md
    for name in ("bench_speed_time.png", "bench_speed_memory.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert set(result["files"]) == {"json", "md", "time", "memory"}


def test_every_registered_preset_runs(tmp_path, no_plots):
    presets = list(PRESETS)  # bare architecture name = its tiny size
    result = run_speed_bench(presets, [16, 24], out_dir=str(tmp_path), **FAST)
    assert len(result["results"]) == 2 * len(presets)
    encoders = set(presets_for("classify")) | set(presets_for("diffusion"))  # no cached decoding: skipped, saying why
    for r in result["results"]:
        for name, m in r["metrics"].items():
            if name == "decode" and r["preset"] in encoders:
                assert m["status"] == "skipped" and "no cached decoding" in m["reason"], r
            else:
                assert m["status"] == "ok", r


@pytest.mark.parametrize(
    "exc",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"),
    ],
)
def test_oom_measurement_is_skipped_not_raised(tmp_path, monkeypatch, no_plots, exc):
    def boom(self, x, y):
        raise exc

    monkeypatch.setattr(CausalLM, "loss", boom)
    result = run_speed_bench(["transformer-tiny"], [16, 32], out_dir=str(tmp_path), **FAST)
    for r in result["results"]:
        assert r["metrics"]["fwd_bwd"]["status"] == "skipped" and r["metrics"]["fwd_bwd"]["oom"]
        assert r["metrics"]["fwd"]["status"] == "ok" and r["metrics"]["decode"]["status"] == "ok"
    assert result["exponents"]["transformer-tiny"]["time"]["fwd_bwd"]["all"] is None
    md = (tmp_path / "bench_speed.md").read_text()
    assert "skipped (OOM)" in md and "fwd_bwd skipped" in md
    json.loads((tmp_path / "bench_speed.json").read_text())  # still valid JSON


def test_other_errors_propagate(tmp_path, monkeypatch, no_plots):
    def boom(self, x, y):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(CausalLM, "loss", boom)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_speed_bench(["transformer-tiny"], [16], out_dir=str(tmp_path), **FAST)


def test_lengths_above_max_seq_len_raise_the_limit(tmp_path, no_plots):
    # tiny max_seq_len is 512; also: comma-separated strings are accepted for presets and lengths
    result = run_speed_bench("mqa-tiny", "520", out_dir=str(tmp_path), **FAST)
    assert result["meta"]["presets"] == ["mqa-tiny"] and result["meta"]["lengths"] == [520]
    assert result["models"]["mqa-tiny"]["max_seq_len_raised_to"] == 524
    assert result["results"][0]["metrics"]["decode"]["status"] == "ok"
    assert result["exponents"]["mqa-tiny"]["time"]["fwd"]["all"] is None  # one length: no slope


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(presets=["no-such-arch"], lengths=[16]), "unknown preset"),
        (dict(presets=["transformer-tiny"], lengths=[0]), "positive integers"),
        (dict(presets=["transformer-tiny"], lengths=[]), "at least one"),
        (dict(presets=["transformer-tiny", "transformer-tiny"], lengths=[16]), "more than once"),
        (dict(presets=["transformer-tiny"], lengths=[16], baseline="gqa-tiny"), "baseline"),
        (dict(presets=["transformer-tiny"], lengths=[16], dtype="int8"), "dtype"),
        (dict(presets=["transformer-tiny"], lengths=[16], device="tpu"), "device"),
        (dict(presets=["transformer-tiny"], lengths=[16], repeats=0), "repeats"),
    ],
)
def test_user_errors(tmp_path, kwargs, match):
    with pytest.raises(SpeedlmError, match=match):
        run_speed_bench(out_dir=str(tmp_path / "x"), progress=False, **kwargs)
    assert not (tmp_path / "x").exists()  # nothing written for a bad call


def test_loglog_slope():
    xs = [32, 64, 128, 256]
    assert loglog_slope(xs, [x**2 for x in xs]) == pytest.approx(2.0)
    assert loglog_slope(xs, [3.0 * x for x in xs]) == pytest.approx(1.0)
    assert loglog_slope(xs, [5.0] * 4) == pytest.approx(0.0)
    assert loglog_slope([32], [1.0]) is None
    assert loglog_slope(xs, [None, 0.0, 4.0, None]) is None


def test_oom_while_building_a_model_skips_its_rows(tmp_path, monkeypatch, no_plots):
    import speedlm.bench.speed as speed

    real = speed.build_seeded

    def build(name, *args, **kw):
        if name == "gqa-tiny":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        return real(name, *args, **kw)

    monkeypatch.setattr(speed, "build_seeded", build)
    result = run_speed_bench(["mqa-tiny", "gqa-tiny"], [16, 24], out_dir=str(tmp_path), **FAST)
    rows = {(r["preset"], r["length"]): r for r in result["results"]}
    assert all(m["status"] == "skipped" for n in (16, 24) for m in rows["gqa-tiny", n]["metrics"].values())
    assert all(m["status"] == "ok" for n in (16, 24) for m in rows["mqa-tiny", n]["metrics"].values())
    assert result["ratios"]["gqa-tiny"][0]["fwd"] is None
    json.loads((tmp_path / "bench_speed.json").read_text())
