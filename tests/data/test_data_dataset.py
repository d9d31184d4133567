"""Encoded corpora, reproducible training batches, contiguous evaluation windows."""

from pathlib import Path

import numpy as np
import pytest
import torch

from speedlm.data import dataset as dataset_mod
from speedlm.data.corpus import text_corpus
from speedlm.data.dataset import TokenStream, encode_corpus, iter_eval_batches
from speedlm.data.tokenizers import BPETokenizer, ByteTokenizer, train_bpe
from speedlm.errors import SpeedlmError


@pytest.fixture
def small_corpus(sample_folder):
    return text_corpus([str(sample_folder)])


# ---------------------------------------------------------------------------- encode_corpus


def test_encode_corpus_bytes(small_corpus):
    train, val = encode_corpus(small_corpus, ByteTokenizer())
    assert train.dtype == np.uint8 and val.dtype == np.uint8
    assert train.tobytes() == small_corpus.train_text.encode("utf-8")
    assert val.tobytes() == small_corpus.val_text.encode("utf-8")
    assert not any(p.name.startswith("ids-") for p in _ls(small_corpus.cache_dir))  # bytes: never cached


def _ls(folder):
    return list(Path(folder).iterdir()) if Path(folder).exists() else []


def test_encode_corpus_bpe_is_cached(small_corpus, monkeypatch):
    tok = train_bpe(small_corpus, 300)
    train, val = encode_corpus(small_corpus, tok)
    assert train.dtype == np.uint16 and val.dtype == np.uint16
    assert tok.decode(train) == small_corpus.train_text and tok.decode(val) == small_corpus.val_text
    cached = sorted(p.name for p in _ls(small_corpus.cache_dir) if p.name.startswith("ids-"))
    assert cached == [
        f"ids-{small_corpus.fingerprint}-{tok.fingerprint()}-train.npy",
        f"ids-{small_corpus.fingerprint}-{tok.fingerprint()}-val.npy",
    ]

    def boom(self, text, progress=False):
        raise AssertionError("re-encoded despite the cache")

    monkeypatch.setattr(BPETokenizer, "encode_large", boom)
    train2, val2 = encode_corpus(small_corpus, tok)
    assert np.array_equal(train, train2) and np.array_equal(val, val2) and train2.dtype == np.uint16


def test_encode_corpus_recovers_from_damaged_cache(small_corpus):
    tok = train_bpe(small_corpus, 300)
    train, _ = encode_corpus(small_corpus, tok)
    damaged = Path(small_corpus.cache_dir) / f"ids-{small_corpus.fingerprint}-{tok.fingerprint()}-train.npy"
    damaged.write_bytes(b"garbage")
    train2, _ = encode_corpus(small_corpus, tok)
    assert np.array_equal(train, train2)


# ---------------------------------------------------------------------------- TokenStream


def test_batch_shapes_and_shift():
    ids = np.arange(1000, dtype=np.uint16)  # ids equal positions, so windows are easy to check
    x, y = TokenStream(ids).batch(step=3, batch_size=8, seq_len=16, seed=1)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y, x + 1)  # contiguous windows of the stream, y one step ahead
    assert int(x.min()) >= 0 and int(y.max()) <= 999


def test_batch_is_pure_function_of_seed_and_step():
    s = TokenStream(np.random.default_rng(0).integers(0, 256, 5000).astype(np.uint8))
    a = s.batch(7, 4, 32, seed=123)
    b = TokenStream(s.ids.copy()).batch(7, 4, 32, seed=123)  # fresh object, e.g. a resumed run
    s.batch(8, 4, 32, seed=123)  # no hidden state advanced by other calls
    c = s.batch(7, 4, 32, seed=123)
    for t in (b, c):
        assert torch.equal(a[0], t[0]) and torch.equal(a[1], t[1])
    assert not torch.equal(a[0], s.batch(8, 4, 32, seed=123)[0])
    assert not torch.equal(a[0], s.batch(7, 4, 32, seed=124)[0])


def test_batch_covers_the_whole_stream_including_last_token():
    s = TokenStream(np.arange(20, dtype=np.int32))
    starts = set()
    last = set()
    for step in range(300):
        x, y = s.batch(step, 4, 5, seed=0)
        starts.update(x[:, 0].tolist())
        last.update(y[:, -1].tolist())
    assert starts == set(range(0, 15))  # every legal window start, no more
    assert 19 in last


def test_batch_accepts_tensors_and_exact_length():
    x, y = TokenStream(torch.arange(9)).batch(0, 2, 8, seed=0)
    assert torch.equal(x[0], torch.arange(8)) and torch.equal(y[0], torch.arange(1, 9))


def test_too_short_stream_is_user_error():
    with pytest.raises(SpeedlmError, match="seq_len"):
        TokenStream(np.arange(8)).batch(0, 2, 8, seed=0)
    with pytest.raises(SpeedlmError):
        TokenStream(np.arange(100)).batch(0, 0, 8, seed=0)
    with pytest.raises(SpeedlmError):
        TokenStream(np.zeros((4, 4), dtype=np.int64))


# ---------------------------------------------------------------------------- eval batches


def test_eval_batches_are_contiguous_and_non_overlapping():
    n, L, B = 1000, 16, 5
    ids = np.arange(n, dtype=np.uint16)
    batches = list(iter_eval_batches(ids, B, L))
    xs = torch.cat([x for x, _ in batches])
    ys = torch.cat([y for _, y in batches])
    n_windows = (n - 1) // L
    assert xs.shape == (n_windows, L) and len(batches) == -(-n_windows // B)
    assert all(x.shape[0] == B for x, _ in batches[:-1])
    # Targets tile ids[1 : n_windows*L + 1] exactly once, in order.
    assert torch.equal(ys.flatten(), torch.arange(1, n_windows * L + 1))
    assert torch.equal(xs.flatten(), torch.arange(0, n_windows * L))
    assert torch.equal(ys, xs + 1)


def test_eval_batches_are_deterministic_and_limited():
    ids = np.random.default_rng(1).integers(0, 300, 2000).astype(np.uint16)
    a = list(iter_eval_batches(ids, 4, 32, max_batches=3))
    b = list(iter_eval_batches(TokenStream(ids), 4, 32, max_batches=3))
    assert len(a) == 3
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    x0 = a[0][0].clone()
    a[0][1].zero_()
    assert torch.equal(a[0][0], x0)  # x and y don't share storage


def test_eval_batches_too_short_is_user_error():
    with pytest.raises(SpeedlmError, match="seq_len"):
        list(iter_eval_batches(np.arange(16), 2, 16))
    assert len(list(iter_eval_batches(np.arange(17), 2, 16))) == 1


MIX_0_0, MIX_1234_99 = 2740863349244528408, 545227005950704121


def test_mix_seed_is_stable():
    # Pinned: changing the derivation would silently change every resumed run's batches.
    assert dataset_mod._mix_seed(0, 0) == MIX_0_0 and dataset_mod._mix_seed(1234, 99) == MIX_1234_99
    assert dataset_mod._mix_seed(0, 1) != dataset_mod._mix_seed(1, 0)
    assert 0 <= dataset_mod._mix_seed(2**40, 10**9) < 2**63
