"""Where derived data (trained BPE tokenizers, encoded token ids) is cached.

Rule: a corpus read from the user's own files caches next to that data, in a `.speedlm/`
subfolder (`Corpus.cache_dir`), so the cache travels and is deleted with the data. When that
folder isn't writable, or the corpus has no home (the stdlib corpus, Hugging Face datasets),
the cache goes to `default_cache_dir()`: `$SPEEDLM_CACHE`, else `~/.cache/speedlm`.

Every write is atomic (temp file + `os.replace`) so an interrupted run never leaves a
half-written cache entry that a later run would trust.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from speedlm.errors import SpeedlmError


def default_cache_dir() -> Path:
    """`$SPEEDLM_CACHE` if set, else `~/.cache/speedlm` (not created here)."""
    env = os.environ.get("SPEEDLM_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "speedlm"


def is_writable_dir(path: str | os.PathLike) -> bool:
    """Create `path` if needed and check a file can be written in it."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        # os.access lies on some network/overlay filesystems; an actual write doesn't.
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
        return True
    except OSError:
        return False


def resolve_cache_dir(preferred: str | os.PathLike | None, explicit: str | os.PathLike | None = None) -> Path:
    """The folder to cache in: `explicit` if given (must be writable), else `preferred` if
    writable (the corpus's `.speedlm/` folder), else `default_cache_dir()`."""
    if explicit is not None:
        if not is_writable_dir(explicit):
            raise SpeedlmError(f"cache folder {explicit} is not writable; pass a writable cache folder")
        return Path(explicit)
    if preferred is not None and is_writable_dir(preferred):
        return Path(preferred)
    fallback = default_cache_dir()
    if not is_writable_dir(fallback):
        raise SpeedlmError(f"cache folder {fallback} is not writable; set SPEEDLM_CACHE to a writable folder")
    return fallback


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so readers see either the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
