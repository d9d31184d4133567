"""`speedlm bench moe`: every dispatch form timed on the same tokens, forward and backward, with
ratios against the per-expert loop; bad sizes are one-line errors."""

import json

import pytest

from speedlm.bench.moe import run_moe_bench
from speedlm.cli import main
from speedlm.errors import SpeedlmError


def test_bench_moe_times_every_form_in_both_passes(tmp_path):
    result = run_moe_bench(tokens=[64], d_model=16, hidden=24, experts=4, top_k=2, repeats=1, out_dir=str(tmp_path))
    rows = result["results"]
    forms = {r["form"] for r in rows}
    assert {"per-expert loop (HF Mixtral)", "sorted grouped (auto)", "sorted grouped (padded bmm)",
            "sorted grouped (sliced)", "matmuls alone (the bound)"} == forms
    assert {r["mode"] for r in rows} == {"forward", "forward+backward"}
    loop = [r for r in rows if r["form"].startswith("per-expert")]
    assert all(r["speedup_vs_loop"] == 1.0 and r["ms"] > 0 for r in loop)
    saved = json.loads((tmp_path / "bench_moe.json").read_text())
    assert saved["meta"]["auto"] in ("grouped_mm", "sliced", "padded") and len(saved["results"]) == len(rows)
    assert "| 64 | forward | sorted grouped (auto) |" in (tmp_path / "bench_moe.md").read_text()


def test_bench_moe_refuses_bad_sizes(tmp_path, capsys):
    with pytest.raises(SpeedlmError, match="top_k=9"):
        run_moe_bench(tokens=[8], experts=4, top_k=9, out_dir=str(tmp_path))
    assert main(["bench", "moe", "--tokens", "8", "--experts", "0", "--out", str(tmp_path)]) == 2
    assert "experts must be an integer >= 1" in capsys.readouterr().err
