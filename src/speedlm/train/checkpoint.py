"""Training checkpoints: the model plus everything a resumed run needs to continue exactly
(optimizer state, RNG states, trainer state), saved atomically in the format of
`speedlm.checkpoint.files` (layout and crash-safety are described there)."""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from speedlm.checkpoint.files import (
    CONFIG_FILE,
    LATEST_FILE,
    OPTIMIZER_FILE,
    RNG_FILE,
    STATE_FILE,
    corrupt,
    full_state_dict,
    list_checkpoints,
    load_weights_into,
    publish_step,
    read_config,
    read_json,
    read_safetensors,
    read_weights,
    resolve_checkpoint,
    write_safetensors,
)
from speedlm.errors import SpeedlmError

__all__ = [
    "LATEST_FILE",
    "Checkpoint",
    "capture_rng",
    "list_checkpoints",
    "load_checkpoint",
    "load_resumable",
    "restore_rng",
    "save_checkpoint",
]

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



# ----- save -----


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
    state = dict(trainer_state or {})
    opt_tensors = None
    if optimizer is not None:
        opt_tensors, state["optimizer"] = _optimizer_split(optimizer)

    def write_training_state(folder: Path) -> None:
        if opt_tensors is not None:
            write_safetensors(folder / OPTIMIZER_FILE, opt_tensors)
        write_safetensors(folder / RNG_FILE, rng_state if rng_state is not None else capture_rng())
        if extra_files_writer is not None:
            extra_files_writer(folder)

    return publish_step(run_dir, step, model, state, keep, write_training_state)



# ----- load -----


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
        return full_state_dict(self.model_tensors, self.tied)

    def restore_model(self, model: nn.Module) -> None:
        load_weights_into(model, self.state_dict(), self.path)

    def restore_optimizer(self, optimizer: torch.optim.Optimizer, load=None) -> None:
        """`load(state_dict)` loads the saved (single-process) state dict (default:
        `optimizer.load_state_dict`; under FSDP, onto the sharded parameters)."""
        if self.optimizer_tensors is None or "optimizer" not in self.trainer_state:
            raise SpeedlmError(f"checkpoint {self.path} has no optimizer state; it cannot be resumed, only loaded")
        try:
            sd = _optimizer_join(self.optimizer_tensors, self.trainer_state["optimizer"])
            (optimizer.load_state_dict if load is None else load)(sd)
        except (ValueError, KeyError, IndexError, RuntimeError) as e:
            raise SpeedlmError(f"checkpoint {self.path} optimizer state does not fit this optimizer: {e}") from None

    def restore_rng(self) -> None:
        if self.rng is None:
            raise SpeedlmError(f"checkpoint {self.path} has no RNG state ({RNG_FILE} missing)")
        try:
            restore_rng(self.rng)
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise corrupt(self.path / RNG_FILE, e) from None

    def build_model(self, device: str | torch.device = "cpu"):
        """A model of the class the config's objective calls for, with these weights."""
        from speedlm.models import build_model

        if self.config is None:
            raise SpeedlmError(f"checkpoint {self.path} has no {CONFIG_FILE}; it cannot be loaded on its own")
        model = build_model(self.config)
        self.restore_model(model)
        return model.to(device)


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint from a step folder or a run folder (follows `latest`).

    Every file is parsed here, so corruption shows up now as a SpeedlmError naming the
    file, never later as a raw traceback halfway through a restore.
    """
    folder = resolve_checkpoint(path)
    state = read_json(folder / STATE_FILE)
    config = read_config(folder) if (folder / CONFIG_FILE).exists() else None
    tensors, tied = read_weights(folder)
    opt = read_safetensors(folder / OPTIMIZER_FILE)[0] if (folder / OPTIMIZER_FILE).exists() else None
    rng = read_safetensors(folder / RNG_FILE)[0] if (folder / RNG_FILE).exists() else None
    return Checkpoint(folder, config, state, tensors, tied, opt, rng)


def load_resumable(run_dir: str | os.PathLike) -> Checkpoint:
    """The checkpoint a `--resume` continues from: the latest one in `run_dir`, with a message
    that says what to do when there is none."""
    run_dir = Path(run_dir)
    if not (run_dir / LATEST_FILE).exists() and not list_checkpoints(run_dir):
        raise SpeedlmError(f"no checkpoint in {run_dir} to resume from; run without resume to start a new run")
    return load_checkpoint(run_dir)
