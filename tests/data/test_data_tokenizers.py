"""Byte and BPE tokenizers: exact round trips, caching, save/load, corrupt files."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from speedlm.data import tokenizers as tok_mod
from speedlm.data.corpus import stdlib_files, text_corpus
from speedlm.data.tokenizers import (
    BPETokenizer,
    ByteTokenizer,
    bpe_cache_path,
    default_cache_dir,
    ids_dtype,
    load_tokenizer,
    make_tokenizer,
    split_for_encoding,
    train_bpe,
)
from speedlm.errors import SpeedlmError

ROUND_TRIP = [
    "",
    "hello world",
    "def f(x):\n\treturn x ** 2  # trailing spaces   \n\n\n",
    "naïve café — déjà vu; Grüße",
    "日本語 🚀 Привет\r\nmixed\u00a0nbsp\u200bzero-width",
    "   leading spaces and unseen chars: ∑∫√ ☃ \x00\x07",
]


@pytest.fixture
def small_corpus(sample_folder):
    return text_corpus([str(sample_folder)])


@pytest.fixture
def bpe(small_corpus, tmp_path):
    return train_bpe(small_corpus, 320, cache_dir=tmp_path / "bpe-cache")


# ---------------------------------------------------------------------------- bytes


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids.dtype == np.int64 and ids.tolist() == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(ids.tolist()) == text
    assert tok.decode(torch.from_numpy(ids)) == text


def test_byte_encode_large_is_compact_and_fast():
    text = "ab€" * 1_000_000  # 5 MB of UTF-8
    ids = ByteTokenizer().encode_large(text)
    assert ids.dtype == np.uint8 and ids.size == len(text.encode("utf-8"))
    assert ids.flags.writeable


def test_byte_decode_skips_out_of_vocab_and_replaces_partial_chars():
    tok = ByteTokenizer()
    assert tok.decode([104, 999, 105, -1]) == "hi"
    assert tok.decode(list("é".encode())[:1]) == "\ufffd"


def test_ids_dtype():
    assert ids_dtype(256) == np.uint8
    assert ids_dtype(257) == np.uint16 and ids_dtype(65536) == np.uint16
    assert ids_dtype(65537) == np.int32


# ---------------------------------------------------------------------------- BPE


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_bpe_round_trip(bpe, text):
    ids = bpe.encode(text)
    assert ids.dtype == np.int64
    assert ids.size == 0 or (ids.min() >= 0 and ids.max() < bpe.vocab_size)
    assert bpe.decode(ids) == text


def test_bpe_compresses_training_text(bpe, small_corpus):
    ids = bpe.encode(small_corpus.train_text)
    assert bpe.vocab_size == 320
    assert bpe._actual > 256  # merges were learned...
    assert len(ids) < 0.8 * len(small_corpus.train_text.encode("utf-8"))  # ...and they compress


def test_chunked_encoding_equals_whole_text_encoding(bpe):
    # A few real stdlib files: varied whitespace, indentation, unicode.
    text = "\n\n".join(p.read_text(encoding="utf-8") for _, p in stdlib_files()[:40])[:150_000]
    pieces = split_for_encoding(text, 997)
    assert "".join(pieces) == text and len(pieces) > 50
    whole = np.asarray(bpe._hf.encode(text, add_special_tokens=False).ids)
    chunked = np.concatenate([np.asarray(bpe._hf.encode(p, add_special_tokens=False).ids) for p in pieces])
    assert np.array_equal(whole, chunked)
    large = bpe.encode_large(text)
    assert large.dtype == np.uint16 and np.array_equal(large, whole)
    assert bpe.decode(large) == text


def test_bpe_is_cached_and_not_retrained(small_corpus, tmp_path, monkeypatch):
    calls = []
    real = tok_mod._train_hf_bpe
    monkeypatch.setattr(tok_mod, "_train_hf_bpe", lambda *a: calls.append(1) or real(*a))
    first = train_bpe(small_corpus, 300, cache_dir=tmp_path)
    path = tmp_path / f"bpe-300-{small_corpus.fingerprint}.json"
    assert path.exists() and len(calls) == 1
    mtime = path.stat().st_mtime_ns
    second = train_bpe(small_corpus, 300, cache_dir=tmp_path)
    assert len(calls) == 1 and path.stat().st_mtime_ns == mtime
    assert second.spec() == first.spec()
    assert np.array_equal(second.encode("Café the dog"), first.encode("Café the dog"))
    train_bpe(small_corpus, 310, cache_dir=tmp_path)  # other vocab: other cache entry
    assert len(calls) == 2


def test_bpe_trains_on_train_split_only(tmp_path, monkeypatch):
    seen = []
    real = tok_mod._train_hf_bpe
    monkeypatch.setattr(tok_mod, "_train_hf_bpe", lambda pieces, v: seen.append("".join(pieces)) or real(pieces, v))
    f = tmp_path / "one.txt"
    f.write_text("train text here. " * 200 + "VALIDATION-ONLY " * 20)
    c = text_corpus([str(f)], val_fraction=0.1)
    train_bpe(c, 300)
    assert seen == [c.train_text]


def test_bpe_cache_location_next_to_data_then_default(sample_folder, tmp_path, monkeypatch):
    c = text_corpus([str(sample_folder)])
    assert bpe_cache_path(c, 300).parent == sample_folder / ".speedlm"
    # Not writable (here: the cache path is taken by a file) -> default cache folder.
    (sample_folder / ".speedlm").rmdir()
    (sample_folder / ".speedlm").write_text("not a folder")
    assert bpe_cache_path(c, 300).parent == default_cache_dir() == tmp_path / "speedlm-cache"
    monkeypatch.delenv("SPEEDLM_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "speedlm"


def test_bpe_cache_does_not_leak_into_corpus(sample_folder):
    before = text_corpus([str(sample_folder)])
    train_bpe(before, 300)  # writes sample_folder/.speedlm/bpe-*.json
    assert any((sample_folder / ".speedlm").iterdir())
    assert text_corpus([str(sample_folder)]).fingerprint == before.fingerprint


def test_bpe_save_load_round_trip(bpe, tmp_path):
    folder = tmp_path / "ckpt"
    bpe.save(folder)
    assert (folder / "tokenizer.json").exists() and (folder / "tokenizer_spec.json").exists()
    spec = bpe.spec()
    assert json.loads(json.dumps(spec)) == spec and spec["kind"] == "bpe" and spec["vocab_size"] == 320
    for loaded in (load_tokenizer(spec, folder), load_tokenizer(None, folder)):
        assert isinstance(loaded, BPETokenizer)
        assert loaded.spec() == spec
        for text in ROUND_TRIP:
            assert np.array_equal(loaded.encode(text), bpe.encode(text))
            assert loaded.decode(loaded.encode(text)) == text


def test_byte_save_load_round_trip(tmp_path):
    ByteTokenizer().save(tmp_path)
    tok = load_tokenizer(None, tmp_path)
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 256
    assert isinstance(load_tokenizer({"kind": "byte", "vocab_size": 256}, None), ByteTokenizer)


def test_corrupt_tokenizer_file_is_user_error(bpe, tmp_path):
    folder = tmp_path / "ckpt"
    bpe.save(folder)
    (folder / "tokenizer.json").write_text("{not json at all")
    with pytest.raises(SpeedlmError, match="corrupt"):
        load_tokenizer(bpe.spec(), folder)


def test_corrupt_cached_bpe_is_user_error(small_corpus, tmp_path):
    train_bpe(small_corpus, 300, cache_dir=tmp_path)
    (tmp_path / f"bpe-300-{small_corpus.fingerprint}.json").write_text('{"model": 42}')
    with pytest.raises(SpeedlmError, match="corrupt"):
        train_bpe(small_corpus, 300, cache_dir=tmp_path)


def test_missing_or_swapped_tokenizer_file_is_user_error(bpe, small_corpus, tmp_path):
    with pytest.raises(SpeedlmError, match="missing"):
        load_tokenizer(bpe.spec(), tmp_path / "nowhere")
    with pytest.raises(SpeedlmError, match="missing"):
        load_tokenizer(None, tmp_path / "nowhere")
    with pytest.raises(SpeedlmError, match="folder"):
        load_tokenizer(bpe.spec(), None)
    other = train_bpe(small_corpus, 300, cache_dir=tmp_path / "other")
    other.save(tmp_path / "ckpt")
    with pytest.raises(SpeedlmError, match="sha256"):
        load_tokenizer(bpe.spec(), tmp_path / "ckpt")


def test_make_tokenizer_and_unknown_kind(small_corpus):
    assert isinstance(make_tokenizer("byte", None, None), ByteTokenizer)
    tok = make_tokenizer("bpe", small_corpus, 300)
    assert isinstance(tok, BPETokenizer) and tok.vocab_size == 300
    with pytest.raises(SpeedlmError, match="unknown tokenizer kind"):
        make_tokenizer("wordpiece", small_corpus, 300)
    with pytest.raises(SpeedlmError, match="unknown tokenizer kind"):
        load_tokenizer({"kind": "wordpiece"}, None)
    with pytest.raises(SpeedlmError):
        make_tokenizer("bpe", None, 300)
    with pytest.raises(SpeedlmError):
        make_tokenizer("byte", None, 512)
    with pytest.raises(SpeedlmError, match="above 256"):
        make_tokenizer("bpe", small_corpus, 200)


def test_default_bpe_vocab_is_4096(small_corpus, monkeypatch):
    seen = []
    monkeypatch.setattr(tok_mod, "train_bpe", lambda c, v, d=None: seen.append(v))
    make_tokenizer("bpe", small_corpus, None)
    assert seen == [4096]
