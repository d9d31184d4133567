"""The spoken-digits task (tasks/spoken_digits.py): log-mel features in torch, a deterministic
pipeline and split, a training run that beats chance, and a one-line error without espeak-ng.
Tests that synthesise skip, saying why, where espeak-ng is not installed."""

import shutil

import numpy as np
import pytest
import torch

from speedlm.cli import main
from speedlm.tasks import load_task
from speedlm.tasks import spoken_digits as sd

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng is not installed (apt-get install espeak-ng) to synthesise the spoken digits")
SMALL = {"voices": ("en", "en-us", "en-029"), "variants": ("", "+f1", "+m3"), "speeds": (130, 190), "pitches": (50,)}


def test_mel_filterbank_and_features_without_speech():
    fb = sd.mel_filterbank()
    assert fb.shape == (sd.N_MELS, sd.N_FFT // 2 + 1) and (fb >= 0).all()
    assert (fb.sum(1) > 0).all()  # every band covers some frequencies
    t = torch.arange(sd.RATE // 2) / sd.RATE
    low = sd.log_mel((0.5 * torch.sin(2 * torch.pi * 300 * t)).numpy().astype(np.float32))
    assert low.shape == (sd.FRAMES, sd.N_MELS)
    assert torch.equal(low[-1], torch.zeros(sd.N_MELS))  # 0.5 s of sound: the rest of the 0.96 s is padding


def test_missing_espeak_is_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(sd.shutil, "which", lambda name: None)
    monkeypatch.setenv("SPEEDLM_CACHE", str(tmp_path))  # nothing cached: it must synthesise
    assert main(["train-classifier", "--task", "spoken-digits", "--steps", "2", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "espeak-ng, which is not installed" in err[0] and "apt-get install espeak-ng" in err[0]


@needs_espeak
def test_pipeline_is_deterministic_and_cached(tmp_path):
    a = load_task("spoken-digits", cache_dir=tmp_path, grid=SMALL, progress=False)
    assert a.x_train.shape[1:] == (sd.FRAMES, sd.N_MELS) and len(a.y_train) + len(a.y_test) == 10 * 3 * 3 * 2
    assert len(a.y_test) == 10 * 2 * 2  # 2 of the 9 speakers held out, every word and speed of theirs
    assert len(list(tmp_path.glob("spoken-digits-*.npz"))) == 1
    b = load_task("spoken-digits", cache_dir=tmp_path, grid=SMALL, progress=False)  # from the cache
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_train, b.y_train)
    one = {**SMALL, "voices": ("en",), "variants": ("", "+f1"), "speeds": (130,)}
    fresh, labels, speakers = sd.generate(one, progress=False)
    assert np.array_equal(fresh, sd.generate(one, progress=False)[0])
    assert labels.tolist() == [w for w in range(10) for _ in range(2)] and speakers.tolist() == [0, 1] * 10
    assert not np.array_equal(fresh[0], fresh[1])  # a variant is another voice, not the same waveform


@needs_espeak
def test_a_tiny_conformer_beats_chance(tmp_path):
    from speedlm.commands.classify import encoder_config
    from speedlm.models import build_model
    from speedlm.train.classifier import ClassifierConfig, train_classifier

    data = load_task("spoken-digits", cache_dir=tmp_path, grid=SMALL, progress=False)
    torch.manual_seed(0)
    model = build_model(encoder_config("conformer-tiny", data))
    r = train_classifier(model, data, ClassifierConfig(steps=150, batch_size=32, eval_every=50, warmup_steps=20), progress=False)
    assert r["train_acc"] > 0.5 and r["test_acc"] > 0.25  # chance: 0.1
