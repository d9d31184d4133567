"""`speedlm bench ops`: rows for the selected ops, written as JSON and Markdown; a filter that
matches nothing is one clear error."""

import json

import pytest

from speedlm.bench.ops import op_names, run_ops_bench, select_ops
from speedlm.errors import SpeedlmError


def test_selected_ops_are_timed_and_written(tmp_path):
    result = run_ops_bench(lengths=[40], repeats=1, out_dir=str(tmp_path), only=["mamba", "ssd"])
    ops = [r["op"] for r in result["results"]]
    assert ops == ["mamba selective scan", "mamba selective scan (tiny: 128 channels)", "mamba-2 SSD"]
    assert all(r["naive_ms"] > 0 and r["fast_ms"] > 0 and r["speedup"] > 0 for r in result["results"])
    assert json.loads((tmp_path / "bench_ops.json").read_text())["results"][0]["op"] == ops[0]
    assert "mamba-2 SSD" in (tmp_path / "bench_ops.md").read_text()


def test_every_op_is_selectable_and_unknown_filters_are_refused():
    assert select_ops(None) == op_names() and len(op_names()) >= 10
    with pytest.raises(SpeedlmError, match="matches no op"):
        select_ops(["no-such-op"])
