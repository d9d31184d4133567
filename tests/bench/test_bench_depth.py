"""`speedlm bench depth`: a training step's peak memory against depth, reversible on and off."""

import json

from speedlm.bench.depth import run_depth_bench
from speedlm.cli import main


def test_bench_depth_shows_reversible_memory_flat_in_depth(tmp_path):
    result = run_depth_bench("reformer-tiny", depths=[2, 4, 8], seq_len=64, repeats=1, out_dir=str(tmp_path))
    rows = result["results"]
    assert {(r["reversible"], r["n_layers"]) for r in rows} == {(rev, n) for rev in (True, False) for n in (2, 4, 8)}
    rev = [r["peak_mem_mib"] for r in rows if r["reversible"]]
    plain = [r["peak_mem_mib"] for r in rows if not r["reversible"]]
    assert plain[2] > 2 * plain[0] and plain[2] > 2 * rev[2]  # ordinary residuals keep every layer's activations
    exp = result["memory_exponent_in_depth"]
    assert exp["reversible=True"] < 0.35 < 0.6 < exp["reversible=False"]
    assert json.loads((tmp_path / "bench_depth.json").read_text())["meta"]["preset"] == "reformer-tiny"


def test_bench_depth_refuses_depths_the_pattern_does_not_tile(tmp_path, capsys):
    assert main(["bench", "depth", "--preset", "samba-tiny", "--depths", "3", "--out", str(tmp_path)]) == 2
    assert "multiple of the pattern length" in capsys.readouterr().err
