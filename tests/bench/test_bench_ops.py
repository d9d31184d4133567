"""`speedlm bench ops`: rows for the selected ops, written as JSON and Markdown; a filter that
matches nothing is one clear error."""

import json

import pytest

from speedlm.bench.ops import op_names, run_ops_bench, select_ops
from speedlm.errors import SpeedlmError


def test_selected_ops_are_timed_and_written(tmp_path):
    result = run_ops_bench(lengths=[40], repeats=1, out_dir=str(tmp_path), only=["mamba", "ssd"])
    ops = [r["op"] for r in result["results"]]
    assert ops[:4] == ["mamba selective scan", "mamba selective scan (eager chunked form)",
                       "mamba selective scan (tiny: 128 channels)", "mamba-2 SSD"]
    # with transformers and mambapy installed, the whole mixer against transformers' MambaMixer
    assert ops[4:] in ([], ["mamba mixer vs transformers MambaMixer (sequential)",
                            "mamba mixer vs transformers MambaMixer (use_mambapy)"])
    assert all(r["naive_ms"] > 0 and r["fast_ms"] > 0 and r["speedup"] > 0 for r in result["results"])
    assert json.loads((tmp_path / "bench_ops.json").read_text())["results"][0]["op"] == ops[0]
    assert "mamba-2 SSD" in (tmp_path / "bench_ops.md").read_text()


def test_every_op_is_selectable_and_unknown_filters_are_refused():
    assert select_ops(None) == op_names() and len(op_names()) >= 10
    with pytest.raises(SpeedlmError, match="matches no op"):
        select_ops(["no-such-op"])


def test_the_transformers_mamba_rows_time_mixers_that_agree_on_the_same_weights():
    pytest.importorskip("transformers")
    pytest.importorskip("mambapy")
    import torch

    from speedlm.bench import hf_mamba

    for use_mambapy in (False, True):
        theirs, ours = hf_mamba.mamba_mixer_pair(use_mambapy, 29)  # raises if they disagree
        with torch.no_grad():
            a, b = theirs(), ours()
        assert a.shape == b.shape == (1, 29, hf_mamba.D_MODEL) and torch.allclose(a, b, rtol=1e-4, atol=1e-5)
