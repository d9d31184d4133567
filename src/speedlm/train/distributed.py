"""Data parallelism applied from outside the model, under `torchrun`.

`speedlm train --parallel ddp|fsdp` launched by `torchrun --nproc-per-node N` runs one process
per rank. Each optimizer step draws the same global batch as a single-process run (the data
stream is a pure function of the step) and each rank takes its contiguous share of the rows,
so no two ranks see the same sequence and the averaged gradients are the single-process ones.
The model never asks for the world size: the trainer wraps it (`DistributedDataParallel`
around a module whose forward is the model's loss, or FSDP2's `fully_shard` on every block and
the root) and only rank 0 writes checkpoints, metrics, plots and progress. FSDP checkpoints
are gathered into the single-process format and re-sharded on resume with
torch.distributed.checkpoint's state-dict API, so a run continues on any world size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from speedlm.errors import SpeedlmError
from speedlm.train.objective import model_loss

PARALLEL = ("none", "ddp", "fsdp")
BACKENDS = ("auto", "nccl", "gloo")  # auto: NCCL when this rank has a GPU, else gloo


@dataclass(frozen=True)
class Parallel:
    kind: str = "none"
    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.world_size:
            raise SpeedlmError(
                f"--batch-size {batch_size} (the global batch) does not split over {self.world_size} processes; "
                f"give a multiple of {self.world_size}"
            )

    def shard(self, x: torch.Tensor, y: torch.Tensor):
        """This rank's rows of the global batch."""
        if self.world_size == 1:
            return x, y
        n = x.shape[0] // self.world_size
        rows = slice(self.rank * n, (self.rank + 1) * n)
        return x[rows], y[rows]

    def wrap(self, model: nn.Module, objective=model_loss):
        """The function a training step calls: (x, y, **meta) -> `objective(model, x, y, **meta)`,
        gradients averaged over ranks. FSDP2 shards every block and the root in place (call it
        before building the optimizer; parameters frozen before it get no gradient and no averaging)."""
        if self.kind == "none":
            return partial(objective, model)
        if self.kind == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for block in model.blocks:
                fully_shard(block)
            fully_shard(model)
            return partial(objective, model)
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [model_device(model).index] if model_device(model).type == "cuda" else None
        return DistributedDataParallel(_LossOf(model, objective), device_ids=device_ids)

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean over ranks (every rank must call it at the same point)."""
        if self.world_size == 1:
            return t
        t = t.clone()
        torch.distributed.all_reduce(t)
        return t / self.world_size

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()


class _LossOf(nn.Module):
    """DDP synchronises the gradients of what its module's forward returns: the objective's loss."""

    def __init__(self, model: nn.Module, objective=model_loss):
        super().__init__()
        self.model = model
        # kept out of the module tree: an objective's teacher is neither broadcast, synchronised
        # nor saved (were the objective an nn.Module, attribute assignment would register it)
        self.__dict__["objective"] = objective

    def forward(self, x, y, **meta):
        return self.objective(self.model, x, y, **meta)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _check_backend(backend: str, cuda: bool) -> str:
    """The communication backend to use, or SpeedlmError when it is unknown or unavailable."""
    if backend not in BACKENDS:
        raise SpeedlmError(f"unknown --dist-backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if backend == "nccl" and not (cuda and torch.distributed.is_nccl_available()):
        raise SpeedlmError("the nccl backend needs CUDA GPUs and a torch build with NCCL; use --dist-backend gloo on CPU")
    if backend == "gloo" and not torch.distributed.is_gloo_available():
        raise SpeedlmError("this torch build has no gloo backend; use --dist-backend nccl on CUDA")
    return backend


def init_parallel(kind: str, device: str = "auto", backend: str = "auto") -> tuple[Parallel, str]:
    """Join the process group torchrun set up; returns (Parallel, the device this rank uses)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if kind not in PARALLEL:
        raise SpeedlmError(f"unknown --parallel {kind!r}; choose one of {', '.join(PARALLEL)}")
    if backend not in BACKENDS:
        raise SpeedlmError(f"unknown --dist-backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if kind == "none":
        if world > 1:
            raise SpeedlmError(f"launched with {world} processes but --parallel none; pass --parallel ddp")
        return Parallel(), device
    if "RANK" not in os.environ:
        raise SpeedlmError(
            f"--parallel {kind} runs under torchrun: torchrun --nproc-per-node N -m speedlm train ... --parallel {kind}"
        )
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not torch.distributed.is_available():
        raise SpeedlmError("this torch build has no torch.distributed; --parallel needs it")
    cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    backend = _check_backend(backend, cuda)
    if cuda:
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    elif device == "auto":
        device = "cpu"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend)
    return Parallel(kind, rank, world), device


# ----- checkpoints under FSDP2: the single-process format, through torch.distributed.checkpoint -----
def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True)


class Gathered:
    """A model or optimizer as `save_checkpoint` reads it: a `state_dict()` (and the model's
    `config`), nothing else."""

    def __init__(self, state: dict, config=None):
        self.state, self.config = state, config

    def state_dict(self) -> dict:
        return self.state


def _param_names(model: nn.Module, optimizer) -> list[str]:
    """The name of each optimizer parameter, in the optimizer's index order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def gather_full(model: nn.Module, optimizer) -> tuple[Gathered, Gathered]:
    """The sharded model and optimizer in the single-process format, gathered by
    torch.distributed.checkpoint's state-dict API (every rank takes part; rank 0 writes): full
    tensors, tied weights one tensor under every name, optimizer state under the parameter
    indices a single process uses."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    weights = get_model_state_dict(model, options=_full_options())
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            weights[name] = weights[first[id(p)]]
        else:
            first[id(p)] = name
    osd = get_optimizer_state_dict(model, optimizer, options=_full_options())
    index = {n: i for i, n in enumerate(_param_names(model, optimizer))}
    state = {index[fqn]: st for fqn, st in osd["state"].items()}
    groups = [{**g, "params": [index[f] for f in g["params"]]} for g in osd["param_groups"]]
    return Gathered(weights, model.config), Gathered({"state": state, "param_groups": groups})


def load_full_optimizer_state(model: nn.Module, optimizer, sd: dict) -> None:
    """Load a single-process optimizer state dict into the optimizer of a sharded model:
    torch.distributed.checkpoint distributes each state tensor like its parameter, whatever
    the world size the state was saved with."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = _param_names(model, optimizer)
    state = {names[int(i)]: st for i, st in sd["state"].items()}
    groups = [{**g, "params": [names[int(i)] for i in g["params"]]} for g in sd["param_groups"]]
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups}, options=_full_options())
