"""Spoken digits: the words "zero" .. "nine" synthesised with espeak-ng in several English
voices and voice variants, speeds and pitches, with background noise, as log-mel frames.

Generated once and cached (`$SPEEDLM_CACHE`, else ~/.cache/speedlm): espeak-ng's 22.05 kHz
waveform, leading and trailing silence trimmed, white noise at an SNR drawn from 5-25 dB (a
seeded generator per clip), then 40 log-mel bands every 20 ms (25 ms Hann window, STFT in
torch), cut or zero-padded to 48 frames (0.96 s) and normalised per band over the clip. The test
set is held-out speakers: a seeded 20% of the (voice, variant) pairs, all their clips, so no
test voice is heard in training.
"""

from __future__ import annotations

import io
import itertools
import math
import shutil
import subprocess
import wave
import zipfile

import numpy as np
import torch

from speedlm.data.cachedir import atomic_write_bytes, resolve_cache_dir
from speedlm.errors import SpeedlmError
from speedlm.tasks.base import TaskData, split

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# espeak-ng 1.51 ignores a variant on "en-gb" (five identical waveforms): "en" takes them
VOICES = ("en", "en-us", "en-gb-scotland", "en-029", "en-gb-x-rp", "en-gb-x-gbclan")
VARIANTS = ("", "+m1", "+m3", "+f1", "+f3")
SPEEDS = (120, 160, 200)  # words per minute
PITCHES = (35, 65)  # espeak-ng's 0-99 scale
RATE = 22050
N_FFT, WIN, HOP, N_MELS, FRAMES = 1024, 551, 441, 40, 48  # 25 ms windows every 20 ms
VERSION = 2  # bump when the synthesis or the features change: a new cache file

INSTALL = "install espeak-ng (Debian/Ubuntu: apt-get install espeak-ng; macOS: brew install espeak-ng)"


def espeak_binary() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise SpeedlmError(f"the spoken-digits task synthesises speech with espeak-ng, which is not installed; {INSTALL}")
    return exe


def synthesise(word: str, voice: str, speed: int, pitch: int, exe: str | None = None) -> np.ndarray:
    """espeak-ng's waveform for `word`, float32 in [-1, 1] at 22.05 kHz."""
    out = subprocess.run([exe or espeak_binary(), "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", word],
                         capture_output=True, check=False)
    if out.returncode != 0 or not out.stdout:
        raise SpeedlmError(f"espeak-ng failed for voice {voice!r}: {out.stderr.decode(errors='replace').strip()[:200]}")
    with wave.open(io.BytesIO(out.stdout)) as w:
        if w.getsampwidth() != 2 or w.getframerate() != RATE:
            raise SpeedlmError(f"espeak-ng gave {w.getframerate()} Hz / {8 * w.getsampwidth()}-bit audio; expected {RATE} Hz 16-bit")
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
    return pcm.astype(np.float32) / 32768.0


def trim_silence(x: np.ndarray, threshold: float = 0.02) -> np.ndarray:
    loud = np.flatnonzero(np.abs(x) > threshold * max(float(np.abs(x).max()), 1e-9))
    return x[loud[0] : loud[-1] + 1] if loud.size else x


def mel_filterbank(n_mels: int = N_MELS, n_fft: int = N_FFT, rate: int = RATE, fmin: float = 20.0, fmax: float | None = None):
    """(n_mels, n_fft // 2 + 1) triangular filters on the HTK mel scale."""
    fmax = fmax or rate / 2
    mel = lambda f: 2595.0 * math.log10(1.0 + f / 700.0)  # noqa: E731
    edges = torch.linspace(mel(fmin), mel(fmax), n_mels + 2, dtype=torch.float64)
    hz = 700.0 * (10 ** (edges / 2595.0) - 1.0)
    bins = torch.linspace(0, rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    lo, mid, hi = hz[:-2, None], hz[1:-1, None], hz[2:, None]
    up, down = (bins - lo) / (mid - lo), (hi - bins) / (hi - mid)
    return torch.clamp(torch.minimum(up, down), min=0.0).float()


def log_mel(x: np.ndarray, frames: int = FRAMES) -> torch.Tensor:
    """(frames, N_MELS): log-mel energies, cut or zero-padded in time, normalised per band."""
    wav = torch.from_numpy(x)
    spec = torch.stft(wav, N_FFT, HOP, WIN, window=torch.hann_window(WIN), center=True, return_complex=True).abs() ** 2
    mel = torch.log(mel_filterbank() @ spec + 1e-6).t()  # (time, mels)
    mel = mel[:frames]
    mel = (mel - mel.mean(0)) / (mel.std(0) + 1e-5)
    if mel.shape[0] < frames:
        mel = torch.cat([mel, mel.new_zeros(frames - mel.shape[0], N_MELS)])
    return mel


def generate(grid: dict, progress: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (word, voice, variant, speed, pitch) clip of `grid` as features (N, FRAMES, N_MELS)
    float16, labels (N,) and speakers (N,): the index of the clip's (voice, variant) pair."""
    from speedlm.progress import progress_bar

    exe = espeak_binary()
    combos = list(itertools.product(range(len(WORDS)), grid["voices"], grid["variants"], grid["speeds"], grid["pitches"]))
    feats, labels, speakers = [], [], []
    speaker_of = {pair: i for i, pair in enumerate(itertools.product(grid["voices"], grid["variants"]))}
    bar = progress_bar(total=len(combos), desc="spoken digits (espeak-ng, once)", unit="clip", disable=not progress)
    for n, (label, voice, variant, speed, pitch) in enumerate(combos):
        bar.update(1)
        wav = trim_silence(synthesise(WORDS[label], voice + variant, speed, pitch, exe))
        rng = np.random.default_rng(n)
        snr_db = rng.uniform(5.0, 25.0)
        noise = rng.standard_normal(wav.shape).astype(np.float32) * math.sqrt(float(np.mean(wav**2)) / 10 ** (snr_db / 10))
        feats.append(log_mel(wav + noise).numpy().astype(np.float16))
        labels.append(label)
        speakers.append(speaker_of[(voice, variant)])
    bar.close()
    return np.stack(feats), np.asarray(labels, dtype=np.int64), np.asarray(speakers, dtype=np.int64)


GRID = {"voices": VOICES, "variants": VARIANTS, "speeds": SPEEDS, "pitches": PITCHES}


def cache_path(grid: dict, cache_dir=None):
    import hashlib

    key = hashlib.sha256(repr((VERSION, WORDS, sorted((k, tuple(v)) for k, v in grid.items()))).encode()).hexdigest()[:12]
    return resolve_cache_dir(None, cache_dir) / f"spoken-digits-v{VERSION}-{key}.npz"


def load_spoken_digits_task(seed: int = 0, test_fraction: float = 0.2, cache_dir=None, progress: bool = True,
                            grid: dict | None = None, **_) -> TaskData:
    """`grid` ({"voices", "variants", "speeds", "pitches"}, default GRID: 1,800 clips) chooses the clips."""
    grid = dict(GRID, **(grid or {}))
    path = cache_path(grid, cache_dir)
    try:
        with np.load(path) as z:
            feats, labels, speakers = z["features"], z["labels"], z["speakers"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # missing or damaged: generate (once)
        feats, labels, speakers = generate(grid, progress)
        buf = io.BytesIO()
        np.savez(buf, features=feats, labels=labels, speakers=speakers)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, buf.getvalue())
    x, y = torch.from_numpy(feats.astype(np.float32)), torch.from_numpy(labels)
    n_speakers = len(grid["voices"]) * len(grid["variants"])
    _, test_speakers = split(n_speakers, test_fraction, seed)  # held-out voices, all their clips
    is_test = torch.isin(torch.from_numpy(speakers), test_speakers)
    train, test = (~is_test).nonzero()[:, 0], is_test.nonzero()[:, 0]
    if len(test) == 0 or len(train) == 0:
        raise SpeedlmError(f"the spoken-digits grid has {n_speakers} speakers: too few for a held-out test set")
    g = grid
    return TaskData("spoken-digits", f"the ten digit words by espeak-ng ({len(g['voices'])} voices x {len(g['variants'])} variants x "
                    f"{len(g['speeds'])} speeds x {len(g['pitches'])} pitches, noise at 5-25 dB SNR) as {FRAMES} log-mel "
                    f"frames of {N_MELS} bands, {len(test_speakers)} of {n_speakers} speakers held out", x[train], y[train], x[test], y[test], len(WORDS))
