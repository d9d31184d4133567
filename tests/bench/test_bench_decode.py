"""bench decode end to end on tiny presets. No test asserts a timing value or a speed ratio."""

import json
import statistics

import pytest

from speedlm.bench.decode import run_decode_bench
from speedlm.cli import main
from speedlm.errors import SpeedlmError


def test_every_preset_and_context_gets_the_median_of_its_own_steps(tmp_path):
    result = run_decode_bench(["transformer-tiny", "hgrn-tiny"], contexts=[48, 16], steps=5, out_dir=str(tmp_path),
                              progress=False)
    assert result["meta"]["contexts"] == [16, 48]  # sorted: ratios are to the shortest
    data = json.loads((tmp_path / "bench_decode.json").read_text())
    for preset in ("transformer-tiny", "hgrn-tiny"):
        r = data["presets"][preset]
        for n in ("16", "48"):
            assert len(r["step_ms"][n]) == 5  # the warm-up step is not counted
            assert r["ms"][n] == statistics.median(r["step_ms"][n])
        assert r["ratio"]["16"] == 1.0 and r["ratio"]["48"] == r["ms"]["48"] / r["ms"]["16"]
    # the transformer's KV cache grows with the context, HGRN's state does not
    assert data["presets"]["transformer-tiny"]["state_bytes"] > data["presets"]["hgrn-tiny"]["state_bytes"]
    assert "| hgrn-tiny |" in (tmp_path / "bench_decode.md").read_text()


def test_bad_arguments_are_one_line(tmp_path, capsys):
    with pytest.raises(SpeedlmError, match="unknown preset"):
        run_decode_bench(["nope-tiny"], out_dir=str(tmp_path), progress=False)
    assert main(["bench", "decode", "--contexts", "0", "--out", str(tmp_path)]) == 2
    assert "contexts" in capsys.readouterr().err


def test_a_model_that_cannot_decode_is_a_row_and_the_others_are_kept(tmp_path):
    from speedlm.models.registry import MIXERS
    from support.parts import NoMixing

    class NoCache(NoMixing):
        supports_decoding = False

    cfg = tmp_path / "nocache.json"
    cfg.write_text(json.dumps({"vocab_size": 256, "d_model": 64, "n_layers": 2, "n_heads": 4, "max_seq_len": 512,
                               "layers": {"A": {"mixer": {"name": "test_nocache"}}}}))
    MIXERS.register("test_nocache", NoCache, family="test", description="test", paper="-")
    try:
        result = run_decode_bench(["hgrn-tiny", str(cfg)], contexts=[16, 32], steps=2, out_dir=str(tmp_path),
                                  progress=False)
    finally:
        MIXERS.unregister("test_nocache")
    assert "does not support cached decoding" in result["presets"][str(cfg)]["skipped"]
    assert len(result["presets"]["hgrn-tiny"]["step_ms"]["32"]) == 2
    assert "skipped: a mixer" in (tmp_path / "bench_decode.md").read_text()


def test_policies_decode_side_by_side_at_equal_slots(tmp_path):
    result = run_decode_bench(["transformer-tiny"], contexts=[24, 40], steps=3, out_dir=str(tmp_path), progress=False,
                              policies=["window", "sink"], slots=19, sinks=4)
    window, sink = result["presets"]["transformer-tiny [window]"], result["presets"]["transformer-tiny [sink]"]
    # both hold 19 KV slots per layer once full: 2 layers x (k, v) x 64 channels x 4 bytes
    assert window["cache_bytes"] == sink["cache_bytes"] == 2 * 2 * 19 * 64 * 4
    assert window["vs_first_policy"] == 1.0
    assert sink["vs_first_policy"] == sink["ms"]["40"] / window["ms"]["40"]
    assert result["meta"]["slots"] == 19
    assert "| transformer-tiny [sink] |" in (tmp_path / "bench_decode.md").read_text()
    with pytest.raises(SpeedlmError, match="policies full, window, sink"):
        run_decode_bench(["transformer-tiny"], out_dir=str(tmp_path), progress=False, policies=["sepllm"])


def test_compiled_rows_carry_the_bandwidth_bound_and_the_linear_floor(tmp_path, monkeypatch):
    """--compile: an eager and a compiled row per preset, each with the weight-read bound and the
    Linear-layers floor, which applies every nn.Linear of the model once per repeat."""
    import torch

    import speedlm.bench.decode as decode
    from speedlm.models import build_model

    model = build_model("hgrn-tiny")
    calls = []
    real = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, w, b=None: (calls.append(w.shape), real(x, w, b))[1])
    decode.linear_floor_probe(model, torch.device("cpu"))()
    monkeypatch.setattr(torch.nn.functional, "linear", real)
    linears = [m.weight.shape for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert calls == linears  # one sweep over every layer
    result = run_decode_bench(["hgrn-tiny"], contexts=[16], steps=3, out_dir=str(tmp_path), progress=False, compile=True)
    rows = result["presets"]
    assert set(rows) == {"hgrn-tiny [full]", "hgrn-tiny [full compiled]"}
    for r in rows.values():  # timed in the steps' rotation: once per step, as many samples as a row has
        assert r["weight_read_ms"] > 0 and r["linear_floor_ms"] > 0
    md = (tmp_path / "bench_decode.md").read_text()
    assert "Linear-layers floor ms" in md and "| hgrn-tiny [full compiled] |" in md
