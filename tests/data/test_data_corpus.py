"""Corpus sources: determinism, the by-file split rule, and user errors."""

import sys

import pytest

from speedlm.data.corpus import (
    FILE_SEPARATOR,
    Corpus,
    build_stdlib_corpus,
    hf_corpus,
    is_val_file,
    load_corpus,
    stdlib_corpus,
    stdlib_files,
    text_corpus,
)
from speedlm.errors import SpeedlmError


# ---------------------------------------------------------------------------- stdlib


def test_stdlib_corpus_is_deterministic_and_non_empty():
    a = build_stdlib_corpus()  # bypass the in-process memo: really rebuild twice
    b = build_stdlib_corpus()
    assert a.fingerprint == b.fingerprint
    assert len(a.fingerprint) == 12 and int(a.fingerprint, 16) >= 0
    assert a.train_text == b.train_text and a.val_text == b.val_text
    assert len(a.train_text) > 1_000_000 and len(a.val_text) > 10_000
    assert a.files == len(stdlib_files()) > 100
    assert a.name.startswith("stdlib-py")
    assert stdlib_corpus() is stdlib_corpus(0.05)  # memoised


def test_stdlib_fingerprint_depends_on_split():
    assert stdlib_corpus(0.05).fingerprint != stdlib_corpus(0.10).fingerprint


def test_stdlib_files_exclude_site_packages_and_tests():
    rels = [rel for rel, _ in stdlib_files()]
    assert rels == sorted(rels)
    assert "os.py" in rels and "json/__init__.py" in rels
    for rel in rels:
        parts = set(rel.split("/")[:-1])
        assert not parts & {"site-packages", "dist-packages", "test", "tests", "idle_test"}, rel
        assert rel.endswith(".py")


def test_stdlib_split_is_by_file():
    c = stdlib_corpus()
    val_files = [(rel, p) for rel, p in stdlib_files() if is_val_file(rel, 0.05)]
    assert 0 < len(val_files) < c.files
    # Large files are unique enough that their full text identifies the side they're on.
    checked = 0
    for rel, path in stdlib_files():
        text = path.read_bytes().decode("utf-8", errors="replace")
        if len(text) < 5000 or checked >= 60:
            continue
        checked += 1
        in_val = is_val_file(rel, 0.05)
        assert (text in c.val_text) == in_val, rel
        assert (text in c.train_text) == (not in_val), rel
    assert checked >= 30


def test_split_rule_matches_documented_formula():
    import hashlib

    for rel in ["os.py", "a/b/c.txt", "x"]:
        expected = int(hashlib.sha256(rel.encode()).hexdigest(), 16) % 1000 < 50
        assert is_val_file(rel, 0.05) == expected


# ---------------------------------------------------------------------------- text files


def _marker_files(folder, n):
    """n files whose text is a unique marker; returns {relpath-in-corpus: marker}."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for i in range(n):
        marker = f"MARKER-{i:03d}-" + "x" * 20
        (folder / f"f{i:03d}.txt").write_text(marker, encoding="utf-8")
        out[f"{folder.name}/f{i:03d}.txt"] = marker
    return out


def test_text_corpus_folder_split_by_file_and_disjoint(tmp_path):
    markers = _marker_files(tmp_path / "docs", 60)
    c = text_corpus([str(tmp_path / "docs")], val_fraction=0.3)
    assert c.files == 60
    val = {rel for rel in markers if is_val_file(rel, 0.3)}
    assert 0 < len(val) < 60
    for rel, marker in markers.items():
        assert (marker in c.val_text) == (rel in val)
        assert (marker in c.train_text) == (rel not in val)
    # Sorted by relpath and joined with the documented separator.
    train_markers = [m for rel, m in sorted(markers.items()) if rel not in val]
    assert c.train_text == FILE_SEPARATOR.join(train_markers)
    assert c.cache_dir == str(tmp_path / "docs" / ".speedlm")


def test_text_corpus_is_deterministic_and_content_sensitive(tmp_path):
    _marker_files(tmp_path / "docs", 10)
    a = text_corpus([str(tmp_path / "docs")])
    b = text_corpus([str(tmp_path / "docs")])
    assert a == b
    (tmp_path / "docs" / "f000.txt").write_text("changed", encoding="utf-8")
    assert text_corpus([str(tmp_path / "docs")]).fingerprint != a.fingerprint


def test_text_corpus_single_file_splits_by_characters(tmp_path):
    f = tmp_path / "book.txt"
    text = "".join(f"line {i}\n" for i in range(1000))
    f.write_text(text, encoding="utf-8")
    c = text_corpus([str(f)], val_fraction=0.1)
    assert c.files == 1
    assert c.train_text + c.val_text == text
    assert len(c.val_text) == int(len(text) * 0.1)
    assert c.cache_dir == str(tmp_path / ".speedlm")


def test_text_corpus_few_files_falls_back_to_character_split(sample_folder, sample_texts):
    c = text_corpus([str(sample_folder)], val_fraction=0.05)
    assert c.files == len(sample_texts)
    assert c.train_text and c.val_text
    whole = c.train_text + c.val_text
    for text in sample_texts.values():
        assert text in whole or text[: len(text) // 2] in whole


def test_text_corpus_suffix_filter_hidden_dirs_and_explicit_files(tmp_path):
    d = tmp_path / "mixed"
    (d / ".speedlm").mkdir(parents=True)
    (d / ".speedlm" / "bpe-300-abc.json").write_text('{"cache": true}')
    (d / "keep.md").write_text("KEEP-ME")
    (d / "skip.bin").write_bytes(b"\x00\x01BINARY")
    (d / "image.png").write_bytes(b"PNG")
    odd = tmp_path / "README"  # no suffix, but named explicitly
    odd.write_text("EXPLICIT-FILE")
    c = text_corpus([str(d), str(odd)])
    whole = c.train_text + c.val_text
    assert c.files == 2
    assert "KEEP-ME" in whole and "EXPLICIT-FILE" in whole
    assert "BINARY" not in whole and "cache" not in whole


def test_text_corpus_does_not_count_a_file_twice(tmp_path):
    _marker_files(tmp_path / "docs", 3)
    c = text_corpus([str(tmp_path / "docs"), str(tmp_path / "docs" / "f001.txt")])
    assert c.files == 3


def test_text_corpus_reads_invalid_utf8_with_replacement(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe still ok " * 10)
    c = text_corpus([str(tmp_path / "bad.txt")])
    assert "\ufffd" in c.train_text + c.val_text


def test_missing_path_is_user_error(tmp_path):
    with pytest.raises(SpeedlmError, match="no such file"):
        text_corpus([str(tmp_path / "nope")])


def test_folder_without_text_files_is_user_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "data.bin").write_bytes(b"\x00")
    with pytest.raises(SpeedlmError, match="no text files"):
        text_corpus([str(tmp_path / "empty")])


def test_empty_files_are_user_error(tmp_path):
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").write_text("")
    with pytest.raises(SpeedlmError, match="empty"):
        text_corpus([str(tmp_path)])


def test_no_paths_and_bad_val_fraction_are_user_errors(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    with pytest.raises(SpeedlmError):
        text_corpus([])
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(SpeedlmError, match="val_fraction"):
            text_corpus([str(tmp_path / "a.txt")], val_fraction=bad)


def test_corpus_repr_does_not_dump_text(tmp_path):
    c = text_corpus([str(_write(tmp_path / "a.txt", "SECRET-TEXT " * 100))])
    assert "SECRET-TEXT" not in repr(c)
    assert isinstance(c, Corpus)


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- dispatch / hf


def test_load_corpus_dispatch(tmp_path):
    assert load_corpus(None) is stdlib_corpus()
    assert load_corpus("stdlib") is stdlib_corpus()
    a = _write(tmp_path / "a.txt", "alpha " * 50)
    b = _write(tmp_path / "b.txt", "beta " * 50)
    c = load_corpus(f"{a}, {b}")
    assert c.files == 2
    assert "alpha" in c.train_text + c.val_text and "beta" in c.train_text + c.val_text


def test_hf_corpus_without_datasets_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(SpeedlmError, match=r"speedlm\[data\]"):
        hf_corpus("roneneldan/TinyStories")
    with pytest.raises(SpeedlmError, match=r"speedlm\[data\]"):
        load_corpus("hf:roneneldan/TinyStories")


def test_hf_corpus_with_fake_datasets(monkeypatch):
    """The record -> document logic, against a stand-in for `datasets` (no network)."""
    import types

    records = [f"story number {i} " * 3 for i in range(200)] + [""]

    class FakeDataset:
        column_names = ["text", "id"]

        def select_columns(self, cols):
            assert cols == ["text"]
            return self

        def iter(self, batch_size):
            for i in range(0, len(records), batch_size):
                yield {"text": records[i : i + batch_size]}

    calls = []

    def load_dataset(path, config, split):
        calls.append((path, config, split))
        return FakeDataset()

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    c = hf_corpus("org/name:cfg", max_chars=1000)
    assert calls == [("org/name", "cfg", "train")]
    assert c.name == "hf:org/name:cfg"
    assert len(c.train_text.replace(FILE_SEPARATOR, "")) + len(c.val_text.replace(FILE_SEPARATOR, "")) == 1000
    full = hf_corpus("org/name")
    assert full.files == 200  # the empty record is skipped
    with pytest.raises(SpeedlmError, match="no column"):
        hf_corpus("org/name", text_field="body")
