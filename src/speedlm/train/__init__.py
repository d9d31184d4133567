"""Training: AdamW + warmup/cosine, crash-safe checkpoints with exact resume, validation,
JSONL metrics, loss plots and MFU.

    from speedlm.train import TrainConfig, train
    summary = train(model, TrainConfig(steps=1000, out_dir="runs/x"), TokenStream(train_ids), val_ids, tokenizer)
    model, state = load_model("runs/x")        # latest checkpoint, for eval / generation
"""

from speedlm.checkpoint import load_model
from speedlm.train.checkpoint import (
    Checkpoint,
    capture_rng,
    list_checkpoints,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from speedlm.train.config import TrainConfig
from speedlm.train.evaluate import evaluate
from speedlm.train.hardware_peak import KNOWN_PEAKS, measure_peak_flops, mfu, peak_flops
from speedlm.train.metrics import MetricsWriter, plot_losses, read_metrics
from speedlm.train.optim import build_optimizer, param_groups
from speedlm.train.schedule import lr_at
from speedlm.train.trainer import METRICS_FILE, PLOT_FILE, train

__all__ = [
    "Checkpoint",
    "KNOWN_PEAKS",
    "METRICS_FILE",
    "MetricsWriter",
    "PLOT_FILE",
    "TrainConfig",
    "build_optimizer",
    "capture_rng",
    "evaluate",
    "list_checkpoints",
    "load_checkpoint",
    "load_model",
    "lr_at",
    "measure_peak_flops",
    "mfu",
    "param_groups",
    "peak_flops",
    "plot_losses",
    "read_metrics",
    "restore_rng",
    "save_checkpoint",
    "train",
]
