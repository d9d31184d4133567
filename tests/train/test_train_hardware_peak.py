"""MFU's denominator: given, datasheet, or measured once per machine and cached."""

import json

import pytest
import torch

from speedlm.errors import SpeedlmError
from speedlm.train import hardware_peak


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEEDLM_CACHE", str(tmp_path))
    monkeypatch.delenv("SPEEDLM_PEAK_FLOPS", raising=False)
    monkeypatch.setattr(hardware_peak, "_memo", {})
    monkeypatch.setattr(hardware_peak, "MEASURE_SECONDS", 0.05)
    return tmp_path


def test_the_peak_is_measured_once_per_machine_and_dtype_then_read_from_the_cache(fresh_cache, monkeypatch):
    calls = []
    real = hardware_peak.measure_peak_flops

    def counting(device, dtype, budget_s=hardware_peak.MEASURE_SECONDS):
        calls.append(dtype)
        return real(device, dtype, budget_s=0.05)

    monkeypatch.setattr(hardware_peak, "measure_peak_flops", counting)
    peak, source = hardware_peak.peak_flops("cpu", torch.float32)
    assert source == "measured" and peak > 1e8
    saved = json.loads((fresh_cache / hardware_peak.CACHE_FILE).read_text())
    key = hardware_peak.machine_key("cpu", torch.float32)
    assert saved[key]["flops"] == peak and "float32" in key and torch.__version__ in key
    monkeypatch.setattr(hardware_peak, "_memo", {})  # a new process reads the file instead of measuring
    assert hardware_peak.peak_flops("cpu", torch.float32) == (peak, "measured")
    assert calls == [torch.float32]
    hardware_peak.peak_flops("cpu", torch.float32, remeasure=True)
    assert len(calls) == 2


def test_a_damaged_cache_is_measured_again(fresh_cache):
    (fresh_cache / hardware_peak.CACHE_FILE).write_text("{not json")
    peak, source = hardware_peak.peak_flops("cpu", torch.float32)
    assert source == "measured" and peak > 0


def test_the_users_peak_wins_and_a_bad_one_is_one_line(fresh_cache, monkeypatch):
    assert hardware_peak.peak_flops("cpu", given=5e11) == (5e11, "given")
    monkeypatch.setenv("SPEEDLM_PEAK_FLOPS", "2e11")
    assert hardware_peak.peak_flops("cpu") == (2e11, "given")
    monkeypatch.setenv("SPEEDLM_PEAK_FLOPS", "fast")
    with pytest.raises(SpeedlmError, match="SPEEDLM_PEAK_FLOPS"):
        hardware_peak.peak_flops("cpu")


def test_mfu_is_a_fraction_that_never_exceeds_one():
    assert hardware_peak.mfu(1e6, 1e4, 1e11) == pytest.approx(0.1)
    assert hardware_peak.mfu(1e6, 1e6, 1e11) == 1.0
    assert hardware_peak.mfu(1e6, 1e4, 0.0) == 0.0
