"""Tokenizers: raw UTF-8 bytes, or byte-level BPE trained on the corpus.

Contract (`Tokenizer`):
  vocab_size           every id produced is in [0, vocab_size).
  encode(text)         -> np.ndarray (n,) int64; safe to hand to torch.from_numpy.
  encode_large(text)   -> np.ndarray (n,) in the compact `ids_dtype(vocab_size)`
                          (uint8/uint16/int32); chunked + batched for whole corpora.
  decode(ids)          -> str. Accepts list / np.ndarray / torch.Tensor. Ids outside the
                          vocab (e.g. sampled from a padded embedding table) are skipped.
  spec()               -> small JSON-able dict: {"kind", "vocab_size", ...}.
  save(folder)         writes `tokenizer_spec.json` (+ `tokenizer.json` for BPE) so that
                          `load_tokenizer(spec, folder)` rebuilds it from a checkpoint folder.

BPE is byte-level (GPT-2 style: ByteLevel pre-tokenizer and decoder, the 256 byte symbols
as the initial alphabet), so any string round-trips exactly: decode(encode(s)) == s.
No special tokens are added; ids 0..255 are the byte symbols.

Caching decision: `train_bpe` stores `bpe-{vocab_size}-{corpus.fingerprint}.json` in
  1. the `cache_dir` argument, if given;
  2. else the corpus's own `.speedlm/` folder (next to the user's files: inside the first
     folder given, or beside the first file), if writable;
  3. else `default_cache_dir()` = `$SPEEDLM_CACHE` or `~/.cache/speedlm`
     (always the case for the stdlib and Hugging Face corpora).
A cached file is loaded instead of retraining. See `speedlm.data.cachedir`.
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import tokenizers as hf_tokenizers  # the Hugging Face library, not this module
from speedlm.progress import progress_bar

from speedlm.data.cachedir import atomic_write_text, default_cache_dir, resolve_cache_dir
from speedlm.data.corpus import Corpus
from speedlm.errors import SpeedlmError

__all__ = [
    "Tokenizer",
    "ByteTokenizer",
    "BPETokenizer",
    "train_bpe",
    "make_tokenizer",
    "load_tokenizer",
    "default_cache_dir",
    "ids_dtype",
    "TOKENIZER_KINDS",
    "DEFAULT_BPE_VOCAB",
]

TOKENIZER_KINDS = ("byte", "bpe")
DEFAULT_BPE_VOCAB = 4096
SPEC_FILE = "tokenizer_spec.json"
BPE_FILE = "tokenizer.json"
CHUNK_CHARS = 1 << 16  # ~64K chars per encode_batch item: big enough to amortise call overhead


def ids_dtype(vocab_size: int) -> np.dtype:
    """Smallest numpy dtype that holds ids in [0, vocab_size): uint8 / uint16 / int32."""
    if vocab_size <= 1 << 8:
        return np.dtype(np.uint8)
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def _as_id_array(ids: Any) -> np.ndarray:
    """list / np.ndarray / torch.Tensor (any device) -> 1-D int64 array."""
    if hasattr(ids, "detach"):  # torch.Tensor without importing torch here
        ids = ids.detach().cpu().numpy()
    return np.asarray(ids, dtype=np.int64).reshape(-1)


class Tokenizer(abc.ABC):
    """Base class; see the module docstring for the contract."""

    kind: ClassVar[str]
    vocab_size: int

    @abc.abstractmethod
    def encode(self, text: str) -> np.ndarray:
        """text -> (n,) int64 ids."""

    def encode_large(self, text: str, progress: bool = False) -> np.ndarray:
        """text -> (n,) ids in `ids_dtype(vocab_size)`; override for speed on big inputs."""
        return self.encode(text).astype(ids_dtype(self.vocab_size))

    @abc.abstractmethod
    def decode(self, ids: Any) -> str:
        """ids (n,) -> text."""

    @abc.abstractmethod
    def spec(self) -> dict:
        """JSON-able description; with `save`'s files it is enough to rebuild the tokenizer."""

    def save(self, folder: str | os.PathLike) -> None:
        """Write what `load_tokenizer(self.spec(), folder)` needs into `folder`."""
        atomic_write_text(Path(folder) / SPEC_FILE, json.dumps(self.spec(), indent=2, sort_keys=True) + "\n")

    def fingerprint(self) -> str:
        """12 hex chars identifying the id mapping (cache key for encoded corpora)."""
        return hashlib.sha256(json.dumps(self.spec(), sort_keys=True).encode()).hexdigest()[:12]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids; vocab 256. Nothing to train or store."""

    kind = "byte"

    def __init__(self) -> None:
        self.vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return self.encode_large(text).astype(np.int64)

    def encode_large(self, text: str, progress: bool = False) -> np.ndarray:
        # frombuffer is a zero-copy view (read-only); copy so callers may write / torch.from_numpy.
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()

    def decode(self, ids: Any) -> str:
        arr = _as_id_array(ids)
        arr = arr[(arr >= 0) & (arr < 256)]
        # errors="replace": a generated sequence can stop mid-character.
        return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def spec(self) -> dict:
        return {"kind": "byte", "vocab_size": 256}


# Safe cut points for chunked encoding: right after a printable, non-space ASCII char that is
# followed by "\n". No GPT-2 pre-token spans a non-space/space boundary, and no regex
# alternative looks behind or past such a char, so encoding the pieces separately gives exactly
# the ids of encoding the whole text. (A cut inside a whitespace run would NOT be safe:
# `\s+(?!\S)` matches differently at end of string.)
_SAFE_CUT = re.compile(r"[!-~](?=\n)")


def split_for_encoding(text: str, chunk_chars: int = CHUNK_CHARS) -> list[str]:
    """Cut `text` into pieces of >= chunk_chars chars (except the last) at pre-token boundaries.

    "".join(pieces) == text, and BPE-encoding each piece and concatenating equals encoding text.
    """
    pieces: list[str] = []
    start = 0
    while len(text) - start > chunk_chars:
        m = _SAFE_CUT.search(text, start + chunk_chars - 1)
        if m is None:
            break
        pieces.append(text[start : m.end()])
        start = m.end()
    if start < len(text):
        pieces.append(text[start:])
    return pieces


def _new_hf_bpe() -> hf_tokenizers.Tokenizer:
    tok = hf_tokenizers.Tokenizer(hf_tokenizers.models.BPE())
    # add_prefix_space=False: a prefix space would be invented at every chunk start and
    # break both chunked encoding and exact round-trips.
    tok.pre_tokenizer = hf_tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = hf_tokenizers.decoders.ByteLevel()
    return tok


def _train_hf_bpe(pieces: list[str], vocab_size: int) -> hf_tokenizers.Tokenizer:
    """Train a byte-level BPE on `pieces` (module-level so tests can count calls)."""
    tok = _new_hf_bpe()
    trainer = hf_tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,  # a merge seen once is memorisation, not compression
        # All 256 byte symbols up front, so text unseen in training still encodes.
        initial_alphabet=hf_tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=sum(map(len, pieces)) > 2_000_000,
    )
    tok.train_from_iterator(iter(pieces), trainer=trainer, length=len(pieces))
    return tok


class BPETokenizer(Tokenizer):
    """Byte-level BPE backed by a Hugging Face `tokenizers.Tokenizer`."""

    kind = "bpe"

    def __init__(self, hf: hf_tokenizers.Tokenizer, vocab_size: int | None = None, json_text: str | None = None):
        """`vocab_size` may exceed the trained size (a small corpus can run out of merges):
        models are sized by the requested number so configs stay predictable.
        `json_text` is the exact serialised form (hashed into the spec); defaults to hf.to_str()."""
        actual = hf.get_vocab_size()
        self.vocab_size = int(vocab_size) if vocab_size is not None else actual
        if actual > self.vocab_size:
            raise SpeedlmError(
                f"tokenizer has {actual} tokens but vocab_size is {self.vocab_size}; the tokenizer file doesn't match"
            )
        self._hf = hf
        self._actual = actual
        self._json = json_text if json_text is not None else hf.to_str()
        self._sha = hashlib.sha256(self._json.encode("utf-8")).hexdigest()
        self._encode_batch = getattr(hf, "encode_batch_fast", hf.encode_batch)  # _fast: tokenizers>=0.20

    @classmethod
    def from_file(cls, path: str | os.PathLike, vocab_size: int | None = None) -> "BPETokenizer":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise SpeedlmError(f"tokenizer file {path} is missing; copy it back or retrain the tokenizer") from None
        except (OSError, UnicodeDecodeError) as e:
            raise SpeedlmError(f"cannot read tokenizer file {path} ({e}); delete it to retrain") from None
        try:
            hf = hf_tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # the Rust side raises plain Exception on bad JSON / schema
            raise SpeedlmError(f"tokenizer file {path} is corrupt ({e}); delete it to retrain") from None
        return cls(hf, vocab_size, json_text=text)

    def encode(self, text: str) -> np.ndarray:
        return self.encode_large(text).astype(np.int64)

    def encode_large(self, text: str, progress: bool = False) -> np.ndarray:
        pieces = split_for_encoding(text)
        out: list[np.ndarray] = []
        dtype = ids_dtype(self.vocab_size)
        group = 32  # pieces per encode_batch call: parallel inside, progress between calls
        with progress_bar(total=len(text), unit="char", unit_scale=True, desc="bpe encode", disable=not progress) as bar:
            for i in range(0, len(pieces), group):
                batch = pieces[i : i + group]
                out.extend(np.asarray(enc.ids, dtype=dtype) for enc in self._encode_batch(batch, add_special_tokens=False))
                bar.update(sum(map(len, batch)))
        return np.concatenate(out) if out else np.zeros(0, dtype=dtype)

    def decode(self, ids: Any) -> str:
        arr = _as_id_array(ids)
        arr = arr[(arr >= 0) & (arr < self._actual)]
        return self._hf.decode(arr.tolist(), skip_special_tokens=False)

    def spec(self) -> dict:
        return {"kind": "bpe", "vocab_size": self.vocab_size, "file": BPE_FILE, "sha256": self._sha}

    def save(self, folder: str | os.PathLike) -> None:
        atomic_write_text(Path(folder) / BPE_FILE, self._json)
        super().save(folder)


def bpe_cache_path(corpus: Corpus, vocab_size: int, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where `train_bpe` keeps (or finds) the tokenizer for this corpus and vocab."""
    folder = resolve_cache_dir(corpus.cache_dir, cache_dir)
    return folder / f"bpe-{vocab_size}-{corpus.fingerprint}.json"


def train_bpe(corpus: Corpus, vocab_size: int = DEFAULT_BPE_VOCAB, cache_dir: str | os.PathLike | None = None) -> BPETokenizer:
    """Byte-level BPE trained on `corpus.train_text` only (val stays unseen); cached by
    (vocab_size, corpus.fingerprint) so the second call just loads the file."""
    if not isinstance(vocab_size, int) or vocab_size <= 256:
        raise SpeedlmError(
            f"BPE vocab_size must be an integer above 256 (the byte alphabet), got {vocab_size}; "
            "use e.g. 4096, or the byte tokenizer"
        )
    if vocab_size >= 1 << 31:
        raise SpeedlmError(f"BPE vocab_size {vocab_size} is too large; use at most 2**31 - 1")
    path = bpe_cache_path(corpus, vocab_size, cache_dir)
    if path.exists():
        return BPETokenizer.from_file(path, vocab_size)
    if not corpus.train_text:
        raise SpeedlmError(f"corpus {corpus.name!r} has no training text; add data")
    hf = _train_hf_bpe(split_for_encoding(corpus.train_text), vocab_size)
    tok = BPETokenizer(hf, vocab_size)
    atomic_write_text(path, tok._json)
    return tok


def make_tokenizer(
    kind: str,
    corpus: Corpus | None = None,
    vocab_size: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Tokenizer:
    """"byte" -> ByteTokenizer (vocab_size must be None or 256);
    "bpe" -> train_bpe(corpus, vocab_size or DEFAULT_BPE_VOCAB, cache_dir)."""
    if kind == "byte":
        if vocab_size not in (None, 256):
            raise SpeedlmError(f"the byte tokenizer has a fixed vocab of 256, got vocab_size={vocab_size}; drop it or use bpe")
        return ByteTokenizer()
    if kind == "bpe":
        if corpus is None:
            raise SpeedlmError("the bpe tokenizer is trained on a corpus; pass one (or use the byte tokenizer)")
        return train_bpe(corpus, DEFAULT_BPE_VOCAB if vocab_size is None else vocab_size, cache_dir)
    raise SpeedlmError(f"unknown tokenizer kind {kind!r}; choose one of {', '.join(TOKENIZER_KINDS)}")


def load_tokenizer(spec: dict | None, folder: str | os.PathLike | None = None) -> Tokenizer:
    """Rebuild a tokenizer from `spec()` and the files `save(folder)` wrote.

    spec=None reads `folder/tokenizer_spec.json`. A BPE spec needs `folder`; the file's sha256
    must match the spec (a different tokenizer.json would silently scramble a model's ids).
    """
    if spec is None:
        if folder is None:
            raise SpeedlmError("load_tokenizer needs a spec or a folder containing tokenizer_spec.json")
        spec_path = Path(folder) / SPEC_FILE
        try:
            spec = json.loads(spec_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SpeedlmError(f"{spec_path} is missing; is {folder} a checkpoint folder?") from None
        except (OSError, ValueError) as e:
            raise SpeedlmError(f"{spec_path} is corrupt ({e}); restore it from the original checkpoint") from None
    if not isinstance(spec, dict) or "kind" not in spec:
        raise SpeedlmError(f"tokenizer spec must be a dict with a 'kind', got {spec!r}; use Tokenizer.spec()")

    kind = spec["kind"]
    if kind == "byte":
        if spec.get("vocab_size", 256) != 256:
            raise SpeedlmError(f"byte tokenizer spec has vocab_size {spec['vocab_size']}, expected 256; fix the spec")
        return ByteTokenizer()
    if kind == "bpe":
        if folder is None:
            raise SpeedlmError("a BPE tokenizer is stored as a file; pass the folder it was saved to")
        tok = BPETokenizer.from_file(Path(folder) / spec.get("file", BPE_FILE), spec.get("vocab_size"))
        if spec.get("sha256") not in (None, tok._sha):
            raise SpeedlmError(
                f"{Path(folder) / spec.get('file', BPE_FILE)} is not the tokenizer this spec was saved with "
                "(sha256 differs); restore the original file"
            )
        return tok
    raise SpeedlmError(f"unknown tokenizer kind {kind!r} in spec; choose one of {', '.join(TOKENIZER_KINDS)}")
