"""Training an encoder (models/encoder.py) on a classification task (speedlm/tasks): AdamW with
the language models' warmup + cosine schedule, batches drawn from a generator seeded by
(seed, step) only, test accuracy measured along training."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from speedlm.errors import SpeedlmError
from speedlm.schema import Schema
from speedlm.tasks.base import TaskData
from speedlm.train.optim import build_optimizer
from speedlm.train.schedule import lr_at


@dataclass
class ClassifierConfig(Schema):
    what = "classifier config"

    steps: int = 600
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 50
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    eval_every: int = 50  # steps between test-accuracy measurements (and at the end)
    seed: int = 0

    def validate(self) -> None:
        self.need_ints(("steps", "batch_size", "eval_every"), 1)
        self.need_ints(("warmup_steps", "seed"), 0)
        self.need(self.warmup_steps <= self.steps, f"warmup_steps={self.warmup_steps} is more than steps={self.steps}")
        self.need(self.lr > 0 and self.weight_decay >= 0 and self.grad_clip >= 0, "lr must be > 0, weight_decay and grad_clip >= 0")


@torch.no_grad()
def accuracy(model, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    was = model.training
    model.eval()
    try:
        right = sum(int((model(x[i : i + batch_size]).argmax(-1) == y[i : i + batch_size]).sum())
                    for i in range(0, len(y), batch_size))
    finally:
        model.train(was)
    return right / len(y)


def train_classifier(model, data: TaskData, cfg: ClassifierConfig, progress: bool = True, desc: str = "train") -> dict:
    """Train `model` on `data`; returns {"history": [{step, loss, test_acc?}], "test_acc",
    "train_acc", "train_s", "params"}."""
    from speedlm.progress import progress_bar

    if len(data.y_train) < 1 or len(data.y_test) < 1:
        raise SpeedlmError(f"task {data.name!r} has an empty train or test split")
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    history, t0 = [], time.perf_counter()
    model.train()
    bar = progress_bar(total=cfg.steps, disable=not progress, unit="step", desc=desc)
    try:
        for step in range(cfg.steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg.steps, cfg.lr, cfg.warmup_steps, 0.1)
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            idx = torch.randint(0, len(data.y_train), (cfg.batch_size,), generator=g)
            loss = model.loss(data.x_train[idx], data.y_train[idx]).total
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            record = {"step": step + 1, "loss": float(loss.detach())}
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                record["test_acc"] = accuracy(model, data.x_test, data.y_test)
                bar.set_postfix(loss=f"{record['loss']:.3f}", test_acc=f"{record['test_acc']:.3f}")
            history.append(record)
            bar.update(1)
    finally:
        bar.close()
    train_s = time.perf_counter() - t0
    return {"history": history, "test_acc": history[-1]["test_acc"], "train_acc": accuracy(model, data.x_train, data.y_train),
            "train_s": train_s, "params": sum(p.numel() for p in model.parameters())}
