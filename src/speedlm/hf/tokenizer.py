"""speedlm tokenizers as Hugging Face fast tokenizers (`tokenizer.json` + its config), so an
exported model folder loads with `AutoTokenizer.from_pretrained` and gives the same ids.

- BPE: speedlm's BPE already is a `tokenizers.Tokenizer`; it is wrapped as it is.
- Bytes: id b is the byte b. The same map as a `tokenizers.Tokenizer`: the byte-level
  pre-tokenizer (no regex split, no prefix space) turns each byte into its printable stand-in
  character, and a BPE model without merges whose vocabulary lists those 256 characters in byte
  order gives each its byte value; the byte-level decoder turns ids back into UTF-8.
"""

from __future__ import annotations

import tokenizers as hf_tokenizers
from transformers import PreTrainedTokenizerFast

from speedlm.data.tokenizers import BPETokenizer, ByteTokenizer
from speedlm.errors import SpeedlmError


def _byte_level_tokenizer() -> hf_tokenizers.Tokenizer:
    alphabet = hf_tokenizers.pre_tokenizers.ByteLevel.alphabet()
    # ByteLevel.alphabet() is the set of stand-ins; their byte order is GPT-2's bytes_to_unicode
    stand_in = _bytes_to_unicode()
    assert set(stand_in) == set(alphabet)
    vocab = {ch: b for b, ch in enumerate(stand_in)}
    tok = hf_tokenizers.Tokenizer(hf_tokenizers.models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = hf_tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = hf_tokenizers.decoders.ByteLevel()
    return tok


def _bytes_to_unicode() -> list[str]:
    """The printable character standing for each byte 0..255 (GPT-2's byte-level map)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def to_hf_tokenizer(tokenizer) -> PreTrainedTokenizerFast:
    """A `PreTrainedTokenizerFast` that encodes and decodes as the speedlm tokenizer does."""
    if isinstance(tokenizer, ByteTokenizer):
        backend = _byte_level_tokenizer()
    elif isinstance(tokenizer, BPETokenizer):
        backend = hf_tokenizers.Tokenizer.from_str(tokenizer._json)
    else:
        raise SpeedlmError(f"no Hugging Face form for the tokenizer {tokenizer!r}")
    return PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False)
