import math

import pytest

from speedlm.errors import SpeedlmError
from speedlm.train import lr_at


def test_warmup_is_linear_and_starts_above_zero():
    assert lr_at(0, 100, 1.0, 10, 0.1) == pytest.approx(0.1)
    assert lr_at(4, 100, 1.0, 10, 0.1) == pytest.approx(0.5)
    assert lr_at(9, 100, 1.0, 10, 0.1) == pytest.approx(1.0)  # last warmup step reaches peak


def test_cosine_peak_midpoint_and_end():
    lr, total, warm, ratio = 2.0, 102, 1, 0.1  # 100 decay steps: midpoint is exact
    assert lr_at(warm, total, lr, warm, ratio) == pytest.approx(lr)
    mid = warm + (total - 1 - warm) // 2
    assert lr_at(mid, total, lr, warm, ratio) == pytest.approx((lr + ratio * lr) / 2)
    assert lr_at(total - 1, total, lr, warm, ratio) == pytest.approx(ratio * lr)
    assert lr_at(total + 50, total, lr, warm, ratio) == pytest.approx(ratio * lr)


def test_monotone_decay_after_warmup():
    vals = [lr_at(s, 50, 1.0, 5, 0.0) for s in range(5, 50)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    assert vals[-1] == 0.0
    assert all(math.isfinite(v) for v in vals)


def test_no_warmup_and_degenerate_lengths():
    assert lr_at(0, 10, 1.0, 0, 0.1) == pytest.approx(1.0)
    assert lr_at(0, 1, 1.0, 0, 0.1) == pytest.approx(1.0)  # a 1-step run isn't stuck at min
    assert lr_at(4, 5, 1.0, 5, 0.1) == pytest.approx(1.0)


def test_bad_arguments():
    with pytest.raises(SpeedlmError):
        lr_at(0, 0, 1.0, 0, 0.1)
    with pytest.raises(SpeedlmError):
        lr_at(0, 10, 1.0, 0, 1.5)
