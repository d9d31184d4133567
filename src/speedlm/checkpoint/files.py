"""The checkpoint format: one folder per saved step, published atomically.

This module knows the layout, the durable writes and the reads that check for corruption;
`speedlm.checkpoint.pretrained` loads a model for inference from it, and
`speedlm.train.checkpoint` saves and resumes training state (optimizer, RNG) with it.

Layout of a run folder (`out_dir`):

    out_dir/
      latest                    text file: the name of the newest complete step folder
      step_0000200/
        model.safetensors       weights; a tied tensor is stored once (see TIED_KEY)
        config.json             ModelConfig.to_json()
        optimizer.safetensors   optimizer tensors, named "state.{param_index}.{key}"
        trainer_state.json      step, data position, schedule, seed, tokenizer spec, metrics,
                                train config, and the optimizer's non-tensor state
        rng.safetensors         RNG states as uint8 tensors (torch CPU, CUDA, numpy, python)
        ...                     extra files, e.g. the tokenizer (`extra_files_writer`)

Why it survives a crash: everything is written into a hidden temporary sibling folder,
fsync'd, and only then renamed to `step_N` with `os.replace` (atomic on POSIX). `latest` is
updated afterwards by writing a temp file and `os.replace`-ing it. A crash at any point
leaves either the old `latest` pointing at the old, complete folder, or the new one; a
half-written folder only ever exists under a `.tmp-` name, which `load_checkpoint` never
reads and the next save deletes. Old step folders are pruned only after `latest` moved.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from speedlm.errors import SpeedlmError

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
RNG_FILE = "rng.safetensors"
LATEST_FILE = "latest"
TMP_PREFIX = ".tmp-"
# safetensors metadata key holding {dropped name: kept name} for tied tensors
TIED_KEY = "speedlm_tied"
FORMAT_VERSION = 1

STEP_RE = re.compile(r"^step_(\d{7,})$")


def step_folder_name(step: int) -> str:
    return f"step_{step:07d}"


# ----- durable writes -----


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    # A rename is only durable once the directory entry is flushed; Windows can't open
    # directories, and there the rename itself is the best we get.
    if os.name == "nt":
        return
    fsync_file(path)


def write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    fsync_file(path)



def model_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The model's state dict with each tied tensor stored once.

    safetensors refuses tensors that share memory; tied weights (embedding = LM head) are
    the same tensor under two names. Keep the first name, record the others as aliases so
    load can fill them back in and use strict loading.
    """
    kept: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in model.state_dict().items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() > 0 and key in seen:
            tied[name] = seen[key]
        else:
            seen[key] = name
            kept[name] = t
    return kept, tied



def publish_step(
    run_dir: str | os.PathLike,
    step: int,
    model: nn.Module,
    state: dict | None = None,
    keep: int = 3,
    write_files: Callable[[Path], None] | None = None,
) -> Path:
    """Atomically write `run_dir/step_{step:07d}`: the model's weights and config, then
    `write_files(folder)` (more files: the optimizer and RNG states of a training run, a
    tokenizer), then the state JSON (`step` and the format version added), whose presence marks
    the folder complete. Points `run_dir/latest` at it and prunes all but the newest `keep` step
    folders. Returns the new folder. `speedlm.train.checkpoint.save_checkpoint` is this plus the
    training state; an imported model needs nothing more."""
    if keep < 1:
        raise SpeedlmError(f"keep={keep} would delete every checkpoint; keep at least 1")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    name = step_folder_name(step)
    final = run_dir / name
    tmp = run_dir / f"{TMP_PREFIX}{name}-{os.getpid()}"
    # leftovers of saves that crashed earlier: never published, safe to delete
    for p in run_dir.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(p, ignore_errors=True)
    tmp.mkdir()
    try:
        weights, tied = model_tensors(model)
        write_safetensors(tmp / MODEL_FILE, weights, {TIED_KEY: json.dumps(tied)})
        config = getattr(model, "config", None)
        if config is not None:
            write_text(tmp / CONFIG_FILE, config.to_json() + "\n")
        if write_files is not None:
            write_files(tmp)
        # the state file last: its presence marks the folder as complete
        write_json(tmp / STATE_FILE, {**(state or {}), "step": step, "format_version": FORMAT_VERSION})
        fsync_dir(tmp)
        if final.exists():
            # re-saving the same step (e.g. interrupted right after a save): swap the old
            # folder out first, since os.replace cannot overwrite a non-empty directory
            trash = run_dir / f"{TMP_PREFIX}old-{name}-{os.getpid()}"
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _point_latest(run_dir, name)
    _prune(run_dir, keep, protect=final)
    return final


def _point_latest(run_dir: Path, name: str) -> None:
    tmp = run_dir / f"{TMP_PREFIX}{LATEST_FILE}-{os.getpid()}"
    write_text(tmp, name + "\n")
    os.replace(tmp, run_dir / LATEST_FILE)
    fsync_dir(run_dir)


def _prune(run_dir: Path, keep: int, protect: Path) -> None:
    folders = list_checkpoints(run_dir)
    for p in folders[: max(0, len(folders) - keep)]:
        if p != protect:
            shutil.rmtree(p, ignore_errors=True)


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete step folders in `run_dir`, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if p.is_dir() and (m := STEP_RE.match(p.name))]
    return [p for _, p in sorted(found)]



def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A step folder from a step folder or a run folder (following `latest`, else the newest
    step folder). SpeedlmError if there is none."""
    path = Path(path)
    if not path.exists():
        raise SpeedlmError(f"no checkpoint at {path}; check the path, or train a model first")
    if path.is_dir() and (path / STATE_FILE).exists():
        return path
    pointer = path / LATEST_FILE
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8", errors="replace").strip()
        if not STEP_RE.match(name):
            raise SpeedlmError(f"checkpoint file {pointer} is corrupt: {name[:40]!r} is not a step folder name; delete it")
        target = path / name
        if not (target / STATE_FILE).is_file():
            raise SpeedlmError(f"checkpoint file {pointer} names {name}, which is missing or incomplete; delete {pointer}")
        return target
    folders = [p for p in list_checkpoints(path) if (p / STATE_FILE).is_file()]
    if folders:
        return folders[-1]
    raise SpeedlmError(f"no checkpoint at {path} (no {LATEST_FILE} file or step_* folder); check the path")


def corrupt(path: Path, err: BaseException) -> SpeedlmError:
    msg = str(err).splitlines()[0] if str(err) else type(err).__name__
    return SpeedlmError(f"checkpoint file {path} is corrupt: {msg}; delete this checkpoint folder and use an older one")


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise SpeedlmError(f"checkpoint {path.parent} is incomplete: {path.name} is missing") from None
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise corrupt(path, e) from None
    if not isinstance(obj, dict):
        raise corrupt(path, ValueError(f"expected a JSON object, got {type(obj).__name__}"))
    return obj


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    if not path.is_file():
        raise SpeedlmError(f"checkpoint {path.parent} is incomplete: {path.name} is missing")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except Exception as e:  # safetensors raises its own error types for bad headers/short files
        raise corrupt(path, e) from None




# ----- reading a model -----
def read_config(folder: Path):
    """The ModelConfig saved in a step folder (SpeedlmError naming the file if it is corrupt)."""
    from speedlm.models import ModelConfig

    if not (folder / CONFIG_FILE).exists():
        raise SpeedlmError(f"checkpoint {folder} has no {CONFIG_FILE}; it cannot be loaded on its own")
    try:
        return ModelConfig.from_dict(read_json(folder / CONFIG_FILE))
    except (SpeedlmError, TypeError) as e:
        raise corrupt(folder / CONFIG_FILE, e) from None


def read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(stored tensors, tied aliases {dropped name: kept name}) of a step folder."""
    tensors, meta = read_safetensors(folder / MODEL_FILE)
    try:
        tied = json.loads(meta.get(TIED_KEY, "{}"))
        assert isinstance(tied, dict) and all(v in tensors for v in tied.values())
    except (ValueError, AssertionError):
        raise corrupt(folder / MODEL_FILE, ValueError("bad tied-weights metadata")) from None
    return tensors, tied


def full_state_dict(tensors: dict[str, torch.Tensor], tied: dict[str, str]) -> dict[str, torch.Tensor]:
    """Model state dict with tied aliases filled back in."""
    sd = dict(tensors)
    for alias, src in tied.items():
        sd[alias] = sd[src]
    return sd


def load_weights_into(model: nn.Module, state_dict: dict[str, torch.Tensor], folder: Path) -> None:
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise SpeedlmError(
            f"checkpoint {folder} does not fit this model ({str(e).splitlines()[0]}); "
            "build the model from the checkpoint's config.json"
        ) from None
