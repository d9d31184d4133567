"""`TrainConfig`: every knob of a training run, validated before any compute is spent."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from speedlm.device import check_dtype_supported, resolve_device
from speedlm.errors import SpeedlmError
from speedlm.schema import Schema, is_number

# the training dtype: "auto" (bf16 autocast on CUDA, fp32 on CPU), bf16 autocast, or plain fp32
DTYPE_ALIASES = {"auto": "auto", "bf16": "bf16", "bfloat16": "bf16", "fp32": "fp32", "float32": "fp32"}
DTYPES = tuple(DTYPE_ALIASES)


@dataclass
class TrainConfig(Schema):
    what = "train config"

    steps: int = 1000  # optimizer steps; the schedule spans exactly these
    batch_size: int = 16  # sequences per micro-batch
    seq_len: int = 256
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to min_lr_ratio * lr
    warmup_steps: int = 100
    weight_decay: float = 0.1  # matrices only, see optim.py
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    eval_every: int = 200  # steps between validations; 0 = only at the end
    eval_batches: int = 20  # validation batches per evaluation
    save_every: int = 500  # steps between checkpoints; 0 = only at the end
    keep: int = 3  # newest checkpoints kept on disk
    seed: int = 0  # data order and RNG seeds
    device: str = "auto"  # "auto" = cuda if available else cpu
    dtype: str = "auto"  # "auto" = bf16 autocast on CUDA, fp32 on CPU; or "bf16"/"bfloat16", "fp32"/"float32"
    peak_flops: float | None = None  # the MFU denominator; None: datasheet or measured (train/hardware_peak.py)
    log_every: int = 10  # steps between metric records / progress-bar updates
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    compile: bool = False  # torch.compile every block (nn.Module.compile: same parameters and state dict)
    # stateful segment mode (train/segments.py): 0 = independent windows; K = groups of K
    # consecutive windows of the same streams, the model's cache carried (detached) between them
    segments: int = 0
    # training FLOPs the run may spend: it stops before a step that would exceed them (None: the
    # steps alone decide). Counted step by step at the model's FLOPs per token as they are then,
    # so a model whose cost follows what it learns (adaptive span) spends what it actually ran
    flop_budget: float | None = None
    out_dir: str = "runs/default"

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum

    def validate(self) -> None:
        need = self.need
        self.need_ints(("steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "keep", "log_every"), 1)
        self.need_ints(("warmup_steps", "eval_every", "save_every", "seed", "segments"), 0)
        need(self.warmup_steps <= self.steps, f"warmup_steps={self.warmup_steps} is more than steps={self.steps}")
        need(is_number(self.lr) and self.lr > 0, f"lr must be positive, got {self.lr!r}")
        need(
            is_number(self.min_lr_ratio) and 0.0 <= self.min_lr_ratio <= 1.0,
            f"min_lr_ratio must be between 0 and 1, got {self.min_lr_ratio!r}",
        )
        need(is_number(self.weight_decay) and self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay!r}")
        need(is_number(self.grad_clip) and self.grad_clip >= 0, f"grad_clip must be >= 0, got {self.grad_clip!r}")
        need(isinstance(self.activation_checkpointing, bool), "activation_checkpointing must be true or false")
        need(isinstance(self.compile, bool), "compile must be true or false")
        need(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        need(
            self.peak_flops is None or (is_number(self.peak_flops) and self.peak_flops > 0),
            f"peak_flops must be a positive number of FLOP/s, got {self.peak_flops!r}",
        )
        need(
            self.flop_budget is None or (is_number(self.flop_budget) and self.flop_budget > 0),
            f"flop_budget must be a positive number of FLOPs, got {self.flop_budget!r}",
        )
        need(isinstance(self.out_dir, str) and self.out_dir.strip() != "", "out_dir must be a non-empty path")
        need(isinstance(self.device, str), f"device must be a string such as 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, ValueError):
                need(False, f"device {self.device!r} is not a torch device; use 'auto', 'cpu' or 'cuda'")

    def check_model(self, model) -> None:
        """Checks that need the model (or just its ModelConfig): the sequence length it allows."""
        max_len = getattr(model, "config", model).max_seq_len
        if self.seq_len > max_len:
            raise SpeedlmError(
                f"invalid train config: seq_len={self.seq_len} is longer than the model's max_seq_len={max_len}; "
                "lower seq_len or build the model with a larger max_seq_len"
            )

    def resolve_device(self) -> torch.device:
        return resolve_device(self.device)

    def autocast_dtype(self, device: torch.device) -> torch.dtype | None:
        """The autocast dtype, or None for plain fp32. bf16 on a CPU without native bf16 matrix
        units is refused (it would be emulated, slower than fp32)."""
        kind = DTYPE_ALIASES.get(self.dtype, self.dtype)
        if kind == "auto":
            return torch.bfloat16 if device.type == "cuda" else None
        if kind != "bf16":
            return None
        check_dtype_supported(device, torch.bfloat16)
        return torch.bfloat16
