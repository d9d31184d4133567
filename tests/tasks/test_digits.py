"""The digits task (tasks/digits.py) and `speedlm train-classifier`: patches, a deterministic
disjoint split, and training that beats chance; bad input is one line."""

import json

import pytest
import torch

from speedlm.cli import main
from speedlm.tasks import load_task
from speedlm.tasks.digits import patches

pytest.importorskip("sklearn", reason="the digits task needs scikit-learn (pip install 'speedlm[tasks]')")


def test_images_become_raster_order_patches():
    img = torch.arange(64.0).view(1, 8, 8)
    p = patches(img)
    assert p.shape == (1, 16, 4)
    assert p[0, 0].tolist() == [0, 1, 8, 9] and p[0, 1].tolist() == [2, 3, 10, 11] and p[0, 4].tolist() == [16, 17, 24, 25]


def test_split_is_deterministic_disjoint_and_complete():
    a, b = load_task("digits"), load_task("digits")
    assert a.x_train.shape == (1438, 16, 4) and a.x_test.shape == (359, 16, 4) and a.num_classes == 10
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_train, b.y_train)
    assert 0.0 <= float(a.x_train.min()) and float(a.x_train.max()) <= 1.0
    rows = {tuple(r.flatten().tolist()) for r in a.x_train} & {tuple(r.flatten().tolist()) for r in a.x_test}
    assert len(rows) < 5  # (the data has a few exact duplicate images; no example is in both splits by index)
    other = load_task("digits", seed=1)
    assert not torch.equal(other.y_test, a.y_test)
    assert set(a.y_test.tolist()) == set(range(10))


def test_train_classifier_beats_chance_and_writes_its_report(tmp_path, capsys):
    out = tmp_path / "digits"
    assert main(["train-classifier", "--task", "digits", "--presets", "transformer-tiny,linformer-tiny", "--steps", "120",
                 "--eval-every", "40", "--out", str(out)]) == 0
    saved = json.loads((out / "results.json").read_text())
    for name in ("transformer-tiny", "linformer-tiny"):
        r = saved["results"][name]
        assert r["test_acc"] > 0.4  # chance is 0.1
        assert [h["step"] for h in r["history"] if "test_acc" in h] == [40, 80, 120]
    assert (out / "accuracy.png").stat().st_size > 0 and "| transformer-tiny |" in (out / "results.md").read_text()


@pytest.mark.parametrize("args, needle", [
    (["--task", "nope"], "unknown task 'nope'"),
    (["--task", "digits", "--presets", "hgrn-tiny"], "causal-only and cannot be used in an encoder"),
    (["--task", "digits", "--presets", "linformer-small"], "k=64 is larger than max_seq_len=17"),
])
def test_bad_input_is_one_line(args, needle, tmp_path, capsys):
    assert main(["train-classifier", *args, "--steps", "2", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
