"""Crash-safe checkpoints: one folder per saved step, published atomically.

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
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
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

_STEP_RE = re.compile(r"^step_(\d{7,})$")


def step_folder_name(step: int) -> str:
    return f"step_{step:07d}"


# ----------------------------------------------------------------------------------------
# low-level durable writes
# ----------------------------------------------------------------------------------------


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    # A rename is only durable once the directory entry is flushed; Windows can't open
    # directories, and there the rename itself is the best we get.
    if os.name == "nt":
        return
    _fsync_file(path)


def _write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    _fsync_file(path)


# ----------------------------------------------------------------------------------------
# state capture: model (tied weights), optimizer, RNG
# ----------------------------------------------------------------------------------------


def _dedupe_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
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


def _optimizer_split(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state dict -> (tensors for safetensors, JSON-able rest)."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{idx}.{k}"] = v
            else:
                scalars.setdefault(str(idx), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "state_scalars": scalars}


def _optimizer_join(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict] = {}
    for name, t in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = t
    for idx, kv in rest.get("state_scalars", {}).items():
        state.setdefault(int(idx), {}).update(kv)
    groups = [dict(g) for g in rest["param_groups"]]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])  # JSON turned the tuple into a list
    return {"state": state, "param_groups": groups}


def _bytes_tensor(obj) -> torch.Tensor:
    return torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)


def _tensor_json(t: torch.Tensor):
    return json.loads(bytes(t.numpy().tobytes()).decode())


def capture_rng() -> dict[str, torch.Tensor]:
    """Every RNG the training process might draw from, as uint8 tensors."""
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"torch_cuda_{i}"] = s
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    out["numpy_keys"] = torch.from_numpy(np.ascontiguousarray(keys).view(np.uint8).copy())
    out["numpy_meta"] = _bytes_tensor({"name": name, "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)})
    out["python"] = _bytes_tensor(random.getstate())
    return out


def restore_rng(states: dict[str, torch.Tensor]) -> None:
    """Inverse of `capture_rng`. CUDA states are restored only when the device count matches."""
    torch.set_rng_state(states["torch_cpu"])
    cuda_keys = sorted((k for k in states if k.startswith("torch_cuda_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    cuda = [states[k] for k in cuda_keys]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    meta = _tensor_json(states["numpy_meta"])
    keys = states["numpy_keys"].numpy().copy().view(np.uint32)
    np.random.set_state((meta["name"], keys, meta["pos"], meta["has_gauss"], meta["gauss"]))
    version, internal, gauss_next = _tensor_json(states["python"])
    random.setstate((version, tuple(internal), gauss_next))


# ----------------------------------------------------------------------------------------
# save
# ----------------------------------------------------------------------------------------


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete step folders in `run_dir`, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    trainer_state: dict | None = None,
    keep: int = 3,
    extra_files_writer: Callable[[Path], None] | None = None,
    rng_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Atomically write `run_dir/step_{step:07d}`, point `run_dir/latest` at it, and prune
    all but the newest `keep` step folders. Returns the new folder.

    `trainer_state` is any JSON-able dict (the trainer stores its step, data position,
    schedule, seed, tokenizer spec, metrics); `step`, the format version and the optimizer's
    non-tensor state are added here. `extra_files_writer(folder)` writes more files into
    the checkpoint before it is published (e.g. `tokenizer.save`), so the checkpoint is
    self-contained. `rng_state` defaults to the current RNG states (`capture_rng()`).
    """
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
        weights, tied = _dedupe_state_dict(model)
        _write_safetensors(tmp / MODEL_FILE, weights, {TIED_KEY: json.dumps(tied)})
        config = getattr(model, "config", None)
        if config is not None:
            _write_text(tmp / CONFIG_FILE, config.to_json() + "\n")
        state = dict(trainer_state or {})
        state["step"] = step
        state["format_version"] = FORMAT_VERSION
        if optimizer is not None:
            opt_tensors, opt_rest = _optimizer_split(optimizer)
            _write_safetensors(tmp / OPTIMIZER_FILE, opt_tensors)
            state["optimizer"] = opt_rest
        _write_safetensors(tmp / RNG_FILE, rng_state if rng_state is not None else capture_rng())
        if extra_files_writer is not None:
            extra_files_writer(tmp)
        # trainer_state.json last: its presence marks the folder as complete
        _write_json(tmp / STATE_FILE, state)
        _fsync_dir(tmp)
        if final.exists():
            # re-saving the same step (e.g. interrupted right after a save): swap the old
            # folder out first, since os.replace cannot overwrite a non-empty directory
            trash = run_dir / f"{TMP_PREFIX}old-{name}-{os.getpid()}"
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _point_latest(run_dir, name)
    _prune(run_dir, keep, protect=final)
    return final


def _point_latest(run_dir: Path, name: str) -> None:
    tmp = run_dir / f"{TMP_PREFIX}{LATEST_FILE}-{os.getpid()}"
    _write_text(tmp, name + "\n")
    os.replace(tmp, run_dir / LATEST_FILE)
    _fsync_dir(run_dir)


def _prune(run_dir: Path, keep: int, protect: Path) -> None:
    folders = list_checkpoints(run_dir)
    for p in folders[: max(0, len(folders) - keep)]:
        if p != protect:
            shutil.rmtree(p, ignore_errors=True)


# ----------------------------------------------------------------------------------------
# load
# ----------------------------------------------------------------------------------------


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
        if not _STEP_RE.match(name):
            raise SpeedlmError(f"checkpoint file {pointer} is corrupt: {name[:40]!r} is not a step folder name; delete it")
        target = path / name
        if not (target / STATE_FILE).is_file():
            raise SpeedlmError(f"checkpoint file {pointer} names {name}, which is missing or incomplete; delete {pointer}")
        return target
    folders = [p for p in list_checkpoints(path) if (p / STATE_FILE).is_file()]
    if folders:
        return folders[-1]
    raise SpeedlmError(f"no checkpoint at {path} (no {LATEST_FILE} file or step_* folder); check the path")


def _corrupt(path: Path, err: BaseException) -> SpeedlmError:
    msg = str(err).splitlines()[0] if str(err) else type(err).__name__
    return SpeedlmError(f"checkpoint file {path} is corrupt: {msg}; delete this checkpoint folder and use an older one")


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise SpeedlmError(f"checkpoint {path.parent} is incomplete: {path.name} is missing") from None
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _corrupt(path, e) from None
    if not isinstance(obj, dict):
        raise _corrupt(path, ValueError(f"expected a JSON object, got {type(obj).__name__}"))
    return obj


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    if not path.is_file():
        raise SpeedlmError(f"checkpoint {path.parent} is incomplete: {path.name} is missing")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except Exception as e:  # safetensors raises its own error types for bad headers/short files
        raise _corrupt(path, e) from None


@dataclass
class Checkpoint:
    """A checkpoint read fully into CPU memory and checked for corruption.

    Restore pieces with `restore_model`, `restore_optimizer`, `restore_rng`, or build a
    fresh model with `build_model`.
    """

    path: Path
    config: object  # ModelConfig, or None if the checkpoint was saved without one
    trainer_state: dict
    model_tensors: dict[str, torch.Tensor]
    tied: dict[str, str]
    optimizer_tensors: dict[str, torch.Tensor] | None
    rng: dict[str, torch.Tensor] | None

    @property
    def step(self) -> int:
        return int(self.trainer_state.get("step", 0))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Model state dict with tied aliases filled back in."""
        sd = dict(self.model_tensors)
        for alias, src in self.tied.items():
            sd[alias] = sd[src]
        return sd

    def restore_model(self, model: nn.Module) -> None:
        try:
            model.load_state_dict(self.state_dict(), strict=True)
        except RuntimeError as e:
            raise SpeedlmError(
                f"checkpoint {self.path} does not fit this model ({str(e).splitlines()[0]}); "
                "build the model from the checkpoint's config.json"
            ) from None

    def restore_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        if self.optimizer_tensors is None or "optimizer" not in self.trainer_state:
            raise SpeedlmError(f"checkpoint {self.path} has no optimizer state; it cannot be resumed, only loaded")
        try:
            optimizer.load_state_dict(_optimizer_join(self.optimizer_tensors, self.trainer_state["optimizer"]))
        except (ValueError, KeyError, RuntimeError) as e:
            raise SpeedlmError(f"checkpoint {self.path} optimizer state does not fit this optimizer: {e}") from None

    def restore_rng(self) -> None:
        if self.rng is None:
            raise SpeedlmError(f"checkpoint {self.path} has no RNG state ({RNG_FILE} missing)")
        try:
            restore_rng(self.rng)
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise _corrupt(self.path / RNG_FILE, e) from None

    def build_model(self, device: str | torch.device = "cpu"):
        from speedlm.models import CausalLM

        if self.config is None:
            raise SpeedlmError(f"checkpoint {self.path} has no {CONFIG_FILE}; it cannot be loaded on its own")
        model = CausalLM(self.config)
        self.restore_model(model)
        return model.to(device)


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint from a step folder or a run folder (follows `latest`).

    Every file is parsed here, so corruption shows up now as a SpeedlmError naming the
    file, never later as a raw traceback halfway through a restore.
    """
    from speedlm.models import ModelConfig

    folder = resolve_checkpoint(path)
    state = _read_json(folder / STATE_FILE)
    config = None
    if (folder / CONFIG_FILE).exists():
        try:
            config = ModelConfig.from_dict(_read_json(folder / CONFIG_FILE))
        except (SpeedlmError, TypeError) as e:
            raise _corrupt(folder / CONFIG_FILE, e) from None
    tensors, meta = _read_safetensors(folder / MODEL_FILE)
    try:
        tied = json.loads(meta.get(TIED_KEY, "{}"))
        assert isinstance(tied, dict) and all(v in tensors for v in tied.values())
    except (ValueError, AssertionError):
        raise _corrupt(folder / MODEL_FILE, ValueError("bad tied-weights metadata")) from None
    opt = _read_safetensors(folder / OPTIMIZER_FILE)[0] if (folder / OPTIMIZER_FILE).exists() else None
    rng = _read_safetensors(folder / RNG_FILE)[0] if (folder / RNG_FILE).exists() else None
    return Checkpoint(folder, config, state, tensors, tied, opt, rng)


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """(CausalLM in eval mode on `device`, trainer_state dict) from a checkpoint, for
    evaluation and generation. `trainer_state["checkpoint_path"]` is the step folder, where
    the tokenizer files were saved (`load_tokenizer(state["tokenizer"], that folder)`)."""
    ckpt = load_checkpoint(path)
    model = ckpt.build_model(device).eval()
    state = dict(ckpt.trainer_state)
    state["checkpoint_path"] = str(ckpt.path)
    return model, state
