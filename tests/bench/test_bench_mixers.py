"""`speedlm bench mixers`: each preset's first mixer timed alone on the same inputs, ratios to
the first preset, memory measured, exponents from the lengths."""

import json

from speedlm.bench.mixers import run_mixers_bench
from speedlm.cli import main


def test_bench_mixers_times_each_mixer_alone(tmp_path):
    result = run_mixers_bench(["transformer-tiny", "dilated-window-tiny"], lengths=[32, 64], repeats=1, out_dir=str(tmp_path))
    rows = result["results"]
    assert {(r["preset"], r["length"]) for r in rows} == {(p, t) for p in ("transformer-tiny", "dilated-window-tiny") for t in (32, 64)}
    assert all(r["fwd_ms"] > 0 and r["peak_mem_mib"] >= 0 for r in rows)
    assert all(r["fwd_ratio"] == 1.0 for r in rows if r["preset"] == "transformer-tiny")
    assert {r["mixer"] for r in rows} == {"Attention", "DilatedWindowAttention"}
    saved = json.loads((tmp_path / "bench_mixers.json").read_text())
    assert set(saved["exponents"]) == {"transformer-tiny", "dilated-window-tiny"}


def test_bench_mixers_refuses_unknown_presets(tmp_path, capsys):
    assert main(["bench", "mixers", "--presets", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown preset" in capsys.readouterr().err
