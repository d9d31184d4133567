"""Text corpora: where training text comes from, split deterministically into train/val.

A `Corpus` holds its whole text in memory (the default stdlib corpus is ~12 MB).

Sources (see `load_corpus` for the string forms the CLI accepts):
  * `stdlib_corpus()`  every `*.py` file of the running interpreter's standard library,
                       minus site-/dist-packages and test folders. Needs nothing on disk
                       beyond Python itself, so it is the default.
  * `text_corpus()`    the user's own files and/or folders.
  * `hf_corpus()`      a Hugging Face dataset (optional `datasets` dependency).

Shared rules, so that the same data gives the same split and fingerprint on every machine:
  * Documents (files, or dataset records) are identified by a relative path with `/`
    separators; stdlib files are sorted by it.
  * Split by document: a document goes to validation iff
        int(sha256(relpath).hexdigest(), 16) % 1000 < round(val_fraction * 1000)
    Hashing the path (not the content) keeps a file on the same side when it is edited.
    If that leaves either side empty (a handful of files), or there is only one document,
    the text is split by characters instead: the last `val_fraction` of it is validation.
  * Documents are joined with `FILE_SEPARATOR` ("\\n\\n"): a blank line reads as a natural
    boundary in code and prose alike, where a path header would be noise in prose.
  * `fingerprint` = first 12 hex chars of sha256 over every (relpath, UTF-8 content) in
    order plus the split rule. Caches (BPE, encoded ids) are keyed by it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from speedlm.errors import SpeedlmError

FILE_SEPARATOR = "\n\n"

# Folder names never descended into for the stdlib corpus: installed third-party packages
# would make the corpus differ between machines; test suites are huge and repetitive.
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})

# Suffixes picked up when walking a folder given to `text_corpus`. A file named explicitly
# is always read, whatever its suffix.
TEXT_SUFFIXES = frozenset(
    {
        ".txt", ".text", ".md", ".markdown", ".rst", ".tex", ".csv", ".tsv", ".log",
        ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".cu", ".rs", ".go", ".java",
        ".kt", ".scala", ".swift", ".js", ".jsx", ".ts", ".tsx", ".rb", ".php", ".lua",
        ".pl", ".r", ".jl", ".hs", ".ml", ".sh", ".bash", ".zsh", ".sql",
        ".html", ".htm", ".xml", ".css", ".scss", ".json", ".jsonl", ".toml", ".yaml",
        ".yml", ".ini", ".cfg",
    }
)

_SPLIT_RULE_VERSION = "speedlm-corpus-v1"


@dataclass(frozen=True)
class Corpus:
    """Train/val text plus identity.

    name        human-readable source, e.g. "stdlib-py3.11", "text:notes/", "hf:roneneldan/TinyStories".
    train_text  all training documents joined by FILE_SEPARATOR.
    val_text    all validation documents joined by FILE_SEPARATOR.
    fingerprint 12 hex chars identifying content + split (cache key).
    files       number of documents read.
    cache_dir   preferred folder for derived caches (a `.speedlm/` next to the user's data),
                or None to use the default cache folder. See `speedlm.data.cachedir`.
    """

    name: str
    train_text: str = field(repr=False)
    val_text: str = field(repr=False)
    fingerprint: str
    files: int
    cache_dir: str | None = None


def is_val_file(relpath: str, val_fraction: float) -> bool:
    """The split rule: True iff the document `relpath` belongs to validation."""
    digest = hashlib.sha256(relpath.encode("utf-8")).hexdigest()
    return int(digest, 16) % 1000 < round(val_fraction * 1000)


def _check_val_fraction(val_fraction: float) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise SpeedlmError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}; use e.g. 0.05")


def _assemble(
    name: str,
    docs: list[tuple[str, str]],
    val_fraction: float,
    cache_dir: str | None = None,
) -> Corpus:
    """Split `docs` [(relpath, text), ...] (already in final order) into a Corpus."""
    _check_val_fraction(val_fraction)
    if not docs or not any(text for _, text in docs):
        raise SpeedlmError(f"corpus {name!r} is empty; point it at files that contain text")

    h = hashlib.sha256(_SPLIT_RULE_VERSION.encode())
    for relpath, text in docs:
        rel_b, text_b = relpath.encode("utf-8"), text.encode("utf-8")
        # Length prefixes make the byte stream unambiguous (no two doc lists hash alike).
        h.update(b"%d:%s%d:" % (len(rel_b), rel_b, len(text_b)))
        h.update(text_b)

    train = [t for p, t in docs if not is_val_file(p, val_fraction)]
    val = [t for p, t in docs if is_val_file(p, val_fraction)]
    if len(docs) > 1 and any(train) and any(val):
        h.update(b"split=file-sha256-mod1000<%d" % round(val_fraction * 1000))
        train_text, val_text = FILE_SEPARATOR.join(train), FILE_SEPARATOR.join(val)
    else:
        text = FILE_SEPARATOR.join(t for _, t in docs)
        if len(text) < 2:
            raise SpeedlmError(f"corpus {name!r} has {len(text)} character(s), too few to split; add more text")
        n_val = min(len(text) - 1, max(1, int(len(text) * val_fraction)))
        h.update(f"split=chars-last-{val_fraction!r}".encode())
        train_text, val_text = text[:-n_val], text[-n_val:]

    return Corpus(
        name=name,
        train_text=train_text,
        val_text=val_text,
        fingerprint=h.hexdigest()[:12],
        files=len(docs),
        cache_dir=cache_dir,
    )


def _read_text(path: Path) -> str:
    # errors="replace": one stray latin-1 byte shouldn't make a whole corpus unusable.
    return path.read_bytes().decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------- stdlib


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[tuple[str, Path]]:
    """[(relpath, absolute path)] of the stdlib `*.py` files in the corpus, sorted by relpath."""
    root = stdlib_root()
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):  # followlinks=False: no escaping root
        dirnames[:] = [d for d in dirnames if d not in STDLIB_SKIP_DIRS]
        for fname in filenames:
            if fname.endswith(".py"):
                path = Path(dirpath) / fname
                found.append((path.relative_to(root).as_posix(), path))
    found.sort(key=lambda item: item[0])
    return found


def stdlib_corpus(val_fraction: float = 0.05) -> Corpus:
    """The default corpus: the Python standard library's own source (~12 MB, ~700 files).

    Same Python version -> same files -> same fingerprint on any machine. Memoised per
    val_fraction: the result is immutable and takes a moment to build.
    """
    return _cached_stdlib_corpus(float(val_fraction))


@functools.lru_cache(maxsize=4)
def _cached_stdlib_corpus(val_fraction: float) -> Corpus:
    return build_stdlib_corpus(val_fraction)


def build_stdlib_corpus(val_fraction: float = 0.05) -> Corpus:
    """`stdlib_corpus` without the memo (always re-reads the files)."""
    files = stdlib_files()
    if not files:
        raise SpeedlmError(f"no .py files found under {stdlib_root()}; pass --data with your own text files")
    docs = [(rel, _read_text(path)) for rel, path in files]
    name = f"stdlib-py{sys.version_info.major}.{sys.version_info.minor}"
    return _assemble(name, docs, val_fraction)


# ---------------------------------------------------------------------------- user files


def _folder_files(folder: Path) -> list[tuple[str, Path]]:
    """Text files under `folder`, relpaths prefixed with the folder's own name."""
    prefix = folder.resolve().name or "root"
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        # Hidden folders hold VCS data and our own `.speedlm/` cache (whose .json files
        # would otherwise leak into the corpus and change its fingerprint run to run).
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
        for fname in filenames:
            path = Path(dirpath) / fname
            if not fname.startswith(".") and path.suffix.lower() in TEXT_SUFFIXES:
                found.append((f"{prefix}/{path.relative_to(folder).as_posix()}", path))
    found.sort(key=lambda item: item[0])
    return found


def text_corpus(paths: list[str] | str, val_fraction: float = 0.05) -> Corpus:
    """A corpus from text files and/or folders (searched recursively for TEXT_SUFFIXES).

    Order: the paths in the order given; inside a folder, sorted by relative path.
    A single file is split by characters (see module docstring). Caches go to a
    `.speedlm/` folder inside the first folder given (or next to the first file).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise SpeedlmError("no data paths given; pass one or more text files or folders")

    files: list[tuple[str, Path]] = []
    for raw in paths:
        p = Path(raw).expanduser()
        if not p.exists():
            raise SpeedlmError(f"{raw}: no such file or folder; check the path (separate several with commas)")
        if p.is_dir():
            found = _folder_files(p)
            if not found:
                raise SpeedlmError(
                    f"{raw}: no text files in this folder (looked for {', '.join(sorted(TEXT_SUFFIXES)[:8])}, ...); "
                    "add some, or name the files explicitly"
                )
            files.extend(found)
        else:
            files.append((p.name, p))

    # The same file reached twice (a folder and a file inside it) would count double.
    seen: set[Path] = set()
    unique = []
    for rel, path in files:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append((rel, path))

    first = Path(paths[0]).expanduser()
    home = first if first.is_dir() else first.parent
    docs = [(rel, _read_text(path)) for rel, path in unique]
    name = "text:" + ",".join(str(p) for p in paths)
    return _assemble(name, docs, val_fraction, cache_dir=str(home / ".speedlm"))


# ---------------------------------------------------------------------------- Hugging Face


def hf_corpus(
    name: str,
    split: str = "train",
    text_field: str = "text",
    max_chars: int | None = None,
    val_fraction: float = 0.05,
) -> Corpus:
    """A corpus from a Hugging Face dataset: `name` is "path" or "path:config"
    (e.g. "roneneldan/TinyStories", "wikitext:wikitext-103-raw-v1").

    Each record of `split` is a document with relpath "{split}/{index}", so the usual
    by-document split rule applies. Reading stops once `max_chars` characters are collected
    (the last record is truncated). Needs the optional `datasets` package and, the first
    time, network access.
    """
    try:
        import datasets  # optional: only this source needs it
    except ImportError:
        raise SpeedlmError(
            "hf: corpora need the `datasets` package; install it with pip install 'speedlm[data]'"
        ) from None
    if max_chars is not None and max_chars <= 0:
        raise SpeedlmError(f"max_chars must be positive, got {max_chars}; omit it to read the whole split")

    path, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(path, config or None, split=split)
    except Exception as e:  # datasets raises many types (FileNotFound, ConnectionError, ValueError, ...)
        raise SpeedlmError(
            f"could not load Hugging Face dataset {name!r} (split {split!r}): {e}; check the name, split and network"
        ) from e
    if text_field not in ds.column_names:
        raise SpeedlmError(
            f"dataset {name!r} has no column {text_field!r} (columns: {', '.join(ds.column_names)}); pass text_field"
        )

    docs: list[tuple[str, str]] = []
    total = 0
    index = 0
    for batch in ds.select_columns([text_field]).iter(batch_size=1000):
        for text in batch[text_field]:
            if text:
                if max_chars is not None and total + len(text) > max_chars:
                    text = text[: max_chars - total]
                docs.append((f"{split}/{index}", text))
                total += len(text)
            index += 1
            if max_chars is not None and total >= max_chars:
                break
        if max_chars is not None and total >= max_chars:
            break

    label = f"hf:{name}" + (f"[{split}]" if split != "train" else "")
    return _assemble(label, docs, val_fraction)


# ---------------------------------------------------------------------------- dispatch


def load_corpus(spec: str | None, *, val_fraction: float = 0.05) -> Corpus:
    """Corpus from a CLI-style string.

    None, "" or "stdlib"      -> stdlib_corpus()
    "hf:PATH[:CONFIG]"        -> hf_corpus(PATH[:CONFIG])
    "a.txt,docs/,more/notes"  -> text_corpus([...]) (comma-separated files/folders)
    """
    if spec is None or spec.strip() in ("", "stdlib"):
        return stdlib_corpus(val_fraction)
    spec = spec.strip()
    if spec.startswith("hf:"):
        return hf_corpus(spec[3:], val_fraction=val_fraction)
    paths = [p.strip() for p in spec.split(",") if p.strip()]
    return text_corpus(paths, val_fraction)
