"""Token streams: encode a corpus once, then cut (x, y) training and evaluation windows.

Training batches are a pure function of (seed, step): `TokenStream.batch` seeds a fresh
`torch.Generator` from both, so a run resumed at step k sees exactly the batches the
uninterrupted run would have seen, and reproduces its losses. There is no epoch/shuffle
state to checkpoint.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from speedlm.data.cachedir import atomic_write_bytes, resolve_cache_dir
from speedlm.data.corpus import Corpus
from speedlm.data.tokenizers import Tokenizer, ids_dtype
from speedlm.errors import SpeedlmError

_PROGRESS_CHARS = 2_000_000  # below this, encoding is quick enough that a bar is just noise


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _load_cached(path: Path, dtype: np.dtype) -> np.ndarray | None:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError):  # missing or damaged: the cache is only an optimisation
        return None
    return arr if arr.dtype == dtype and arr.ndim == 1 else None


SPLITS = ("train", "val")


def encode_split(
    corpus: Corpus,
    tokenizer: Tokenizer,
    split: str,
    cache_dir: str | os.PathLike | None = None,
) -> np.ndarray:
    """One split's ids, (n,) in `ids_dtype(tokenizer.vocab_size)` (uint8 for bytes, uint16 up
    to 65536 tokens, else int32): evaluation encodes the validation split only.

    Byte encoding is a memcpy, so it is never cached. Other tokenizers cache the array as
    `ids-{corpus.fingerprint}-{tokenizer.fingerprint()}-{split}.npy` in the same folder as the
    BPE cache (see speedlm.data.cachedir), so the second run is instant.
    """
    if split not in SPLITS:
        raise SpeedlmError(f"unknown split {split!r}; use one of {SPLITS}")
    dtype = ids_dtype(tokenizer.vocab_size)
    path = None
    if tokenizer.kind != "byte":
        folder = resolve_cache_dir(corpus.cache_dir, cache_dir)
        path = folder / f"ids-{corpus.fingerprint}-{tokenizer.fingerprint()}-{split}.npy"
        cached = _load_cached(path, dtype)
        if cached is not None:
            return cached
    text = corpus.train_text if split == "train" else corpus.val_text
    ids = tokenizer.encode_large(text, progress=len(text) > _PROGRESS_CHARS and tokenizer.kind != "byte")
    if ids.size == 0:
        raise SpeedlmError(f"corpus {corpus.name!r} encodes to no tokens in its {split} split; add more text")
    if path is not None:
        atomic_write_bytes(path, _npy_bytes(ids))
    return ids


def encode_corpus(
    corpus: Corpus,
    tokenizer: Tokenizer,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(train_ids, val_ids): `encode_split` of both splits."""
    return tuple(encode_split(corpus, tokenizer, split, cache_dir) for split in SPLITS)


def require_tokens(n: int, seq_len: int, what: str = "the token stream") -> None:
    """The one "too few tokens" check: a window needs seq_len inputs plus the next token."""
    if n < seq_len + 1:
        raise SpeedlmError(
            f"{what} has {n} tokens, fewer than seq_len + 1 = {seq_len + 1}; use a shorter seq_len or more data"
        )


def _mix_seed(seed: int, step: int) -> int:
    """Independent 63-bit generator seed per (seed, step); sha256 so nearby pairs don't
    give correlated streams (and Python's salted hash() isn't stable across processes)."""
    digest = hashlib.sha256(f"speedlm-batch:{seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _as_numpy_ids(ids: Any) -> np.ndarray:
    if isinstance(ids, TokenStream):
        return ids.ids
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise SpeedlmError(f"token ids must be a 1-D integer array, got shape {arr.shape} dtype {arr.dtype}")
    return arr


def _check_positive(**kw: int) -> None:
    for name, v in kw.items():
        if int(v) != v or v < 1:
            raise SpeedlmError(f"{name} must be a positive integer, got {v}")


class TokenStream:
    """A 1-D token array sampled in random windows.

    Kept as numpy (any integer dtype) rather than a torch tensor: uint16 tensors support
    few ops, and numpy fancy indexing on the compact dtype is fast and light.
    """

    def __init__(self, ids: Any):
        self.ids = _as_numpy_ids(ids)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def batch(self, step: int, batch_size: int, seq_len: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), both (batch_size, seq_len) int64 on CPU; y[:, t] == x[:, t + 1] inside each
        window (y is x shifted left by one, plus the next token).

        Window starts are uniform in [0, len - seq_len - 1], drawn from a generator seeded by
        (seed, step) only: the same arguments always give the same batch.
        """
        _check_positive(batch_size=batch_size, seq_len=seq_len)
        n = len(self)
        require_tokens(n, seq_len)
        g = torch.Generator().manual_seed(_mix_seed(seed, step))
        starts = torch.randint(0, n - seq_len, (batch_size,), generator=g).numpy()
        windows = self.ids[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64)  # (B, T+1)
        w = torch.from_numpy(windows)
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()


def segment_batch(stream: "TokenStream", index: int, batch_size: int, seq_len: int, segments: int, seed: int = 0):
    """Segment mode's micro-batch `index`: (x, y, j). Micro-batches come in groups of
    `segments`; group g draws batch_size stream starts from a generator seeded by (seed, g)
    only, and its j-th micro-batch is every stream's j-th consecutive window of seq_len tokens,
    so a memory carried from micro-batch j - 1 to j continues each row's text."""
    _check_positive(batch_size=batch_size, seq_len=seq_len, segments=segments)
    n = len(stream)
    require_tokens(n, segments * seq_len)
    group, j = divmod(index, segments)
    g = torch.Generator().manual_seed(_mix_seed(seed, group))
    starts = torch.randint(0, n - segments * seq_len, (batch_size,), generator=g).numpy() + j * seq_len
    w = torch.from_numpy(stream.ids[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64))
    return w[:, :-1].contiguous(), w[:, 1:].contiguous(), j


def iter_memory_batches(ids: Any, batch_size: int, seq_len: int, max_batches: int | None = None):
    """Evaluation with memory: the stream cut into batch_size contiguous parts, one per row;
    batch i is every part's i-th window of seq_len tokens (targets shifted by one), so a cache
    carried from batch to batch continues each row's text. Every target is scored once."""
    _check_positive(batch_size=batch_size, seq_len=seq_len)
    arr = _as_numpy_ids(ids)
    part = (len(arr) - 1) // batch_size
    windows = part // seq_len
    if max_batches is not None:
        windows = min(windows, max_batches)
    for i in range(windows):
        starts = np.arange(batch_size) * part + i * seq_len
        w = torch.from_numpy(arr[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64))
        yield w[:, :-1].contiguous(), w[:, 1:].contiguous()


def iter_eval_batches(
    ids: Any,
    batch_size: int,
    seq_len: int,
    max_batches: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic evaluation windows over a whole stream (e.g. validation ids).

    Window i is x = ids[i*L : (i+1)*L], y = ids[i*L + 1 : (i+1)*L + 1] with L = seq_len, for
    i in [0, (len - 1) // L): the targets tile ids[1 : n_windows*L + 1] with no overlap and
    no gap, so summing per-token losses gives the stream's perplexity. Yields
    (x, y) int64 of shape (k, seq_len), k = batch_size except possibly the last batch.
    """
    _check_positive(batch_size=batch_size, seq_len=seq_len)
    if max_batches is not None and max_batches < 1:
        raise SpeedlmError(f"max_batches must be a positive integer or None, got {max_batches}")
    arr = _as_numpy_ids(ids)
    require_tokens(len(arr), seq_len, "the evaluation stream")
    n_windows = (len(arr) - 1) // seq_len
    for b, first in enumerate(range(0, n_windows, batch_size)):
        if max_batches is not None and b >= max_batches:
            return
        k = min(batch_size, n_windows - first)
        block = torch.from_numpy(arr[first * seq_len : (first + k) * seq_len + 1].astype(np.int64))
        # clone: x and y would otherwise share storage, and an in-place edit of one would hit both.
        yield block[:-1].view(k, seq_len), block[1:].clone().view(k, seq_len)
