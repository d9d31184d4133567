"""Separator detection for SepLLM: the byte tokenizer's nine characters, merged BPE tokens made
only of separators, nothing else; user overrides by characters or ids."""

import pytest

from speedlm.data.corpus import text_corpus
from speedlm.data.separators import SEPARATOR_CHARS, resolve_separators, separator_ids
from speedlm.data.tokenizers import ByteTokenizer, train_bpe
from speedlm.errors import SpeedlmError
from speedlm.separators import BYTE_SEPARATORS


def test_byte_separators_are_exactly_the_nine_characters():
    tok = ByteTokenizer()
    assert separator_ids(tok) == sorted(ord(c) for c in SEPARATOR_CHARS)
    assert tuple(separator_ids(tok)) == BYTE_SEPARATORS  # the SepLLM layer's default without a tokenizer


def test_bpe_separators_include_merged_tokens_and_only_separator_text(sample_folder, tmp_path):
    tok = train_bpe(text_corpus([str(sample_folder)]), 320, cache_dir=tmp_path / "bpe")
    ids = separator_ids(tok)
    texts = [tok.decode([i]) for i in ids]
    assert all(t and set(t) <= set(SEPARATOR_CHARS) for t in texts)
    assert any(len(t) > 1 for t in texts), texts  # merges such as ".\n" or "    " (Python indents)
    for c in SEPARATOR_CHARS:  # each character on its own is one of them
        assert [int(i) for i in tok.encode(c)] in [[i] for i in ids], repr(c)
    for word in ("def", "return", "The", "é"):  # words, and pieces of multi-byte characters
        assert not set(int(i) for i in tok.encode(word)) & set(ids), word


def test_users_override_by_characters_or_ids():
    tok = ByteTokenizer()
    assert resolve_separators(tok, "\n") == [10]
    assert resolve_separators(tok, [46, 10, 10]) == [10, 46]
    assert resolve_separators(tok) == separator_ids(tok)
    with pytest.raises(SpeedlmError, match="outside the vocabulary"):
        resolve_separators(tok, [300])
    with pytest.raises(SpeedlmError, match="empty"):
        resolve_separators(tok, [])
