"""Separator tokens for SepLLM (Chen et al. 2024, arXiv:2412.12094): the tokens whose text is
only punctuation from `. , ? ! ; :`, newlines, tabs or spaces. SepLLM keeps them (with the first
tokens and a local window) because they come to summarise the segment before them.

Derived from any tokenizer by decoding each id on its own: for the byte tokenizer that is the
nine single-byte characters; for byte-level BPE it also takes merged tokens made only of them
(".\\n", "    ", ", ", "\\n\\n"). A token that is a fragment of a multi-byte character decodes
to the replacement character and is never a separator. Users may pass their own characters or
their own ids instead.
"""

from __future__ import annotations

from collections.abc import Iterable

from speedlm.data.tokenizers import Tokenizer
from speedlm.errors import SpeedlmError
from speedlm.separators import SEPARATOR_CHARS

__all__ = ["SEPARATOR_CHARS", "parse_separators", "record_separators", "resolve_separators", "separator_ids"]


def separator_ids(tokenizer: Tokenizer, chars: str = SEPARATOR_CHARS) -> list[int]:
    """Sorted ids whose decoded text is non-empty and made only of `chars`."""
    allowed = set(chars)
    if not allowed:
        raise SpeedlmError("separator characters must not be empty")
    found = []
    for i in range(tokenizer.vocab_size):
        text = tokenizer.decode([i])
        if text and set(text) <= allowed:
            found.append(i)
    return found


def resolve_separators(tokenizer: Tokenizer, spec: str | Iterable[int] | None = None) -> list[int]:
    """The separator ids for `spec`: None -> derived from SEPARATOR_CHARS; a string -> derived
    from those characters; ids -> checked against the vocabulary (sorted, deduplicated)."""
    if spec is None:
        return separator_ids(tokenizer)
    if isinstance(spec, str):
        return separator_ids(tokenizer, spec)
    ids = sorted({int(i) for i in spec})
    bad = [i for i in ids if not 0 <= i < tokenizer.vocab_size]
    if bad:
        raise SpeedlmError(f"separator ids {bad[:5]} are outside the vocabulary [0, {tokenizer.vocab_size})")
    if not ids:
        raise SpeedlmError("the separator list is empty; SepLLM needs at least one separator id")
    return ids


def parse_separators(text: str | None) -> str | list[int] | None:
    """A command-line separator spec: comma-separated integers are ids; anything else is a
    string of characters, backslash escapes understood ("\\n", "\\t")."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    if len(parts) > 0 and all(p.isdigit() for p in parts):
        return [int(p) for p in parts]
    import codecs

    try:
        return codecs.decode(text, "unicode_escape")
    except UnicodeDecodeError as e:
        raise SpeedlmError(f"cannot read separator characters {text!r}: {e.reason}") from None


def record_separators(config, tokenizer: Tokenizer, spec: str | Iterable[int] | None = None):
    """The model config with the tokenizer's separator ids recorded (`spec` overrides; a config
    that already has its own keeps them unless `spec` is given), so SepLLM layers and
    `--attention sepllm` later find the ids the model was trained with. Rebuilt through the
    config's own `from_dict`, so it is validated again (and this layer needs nothing of models)."""
    if config.separators is not None and spec is None:
        return config
    return type(config).from_dict({**config.to_dict(), "separators": resolve_separators(tokenizer, spec)})
