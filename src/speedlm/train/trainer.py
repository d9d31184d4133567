"""The training loop: AdamW + warmup/cosine, grad accumulation, clipping, periodic
validation, JSONL metrics, crash-safe checkpoints and exact resume.

Exact resume rests on one rule: everything a step consumes is a pure function of the step
number. Micro-batch `m` of step `s` is `train_stream.batch(s * grad_accum + m, ...)`, the
learning rate is `lr_at(s, ...)`, and the model and optimizer state come from the
checkpoint. So a run resumed from step k computes bit-for-bit the losses the uninterrupted
run computed (on the same device and thread count).
"""

from __future__ import annotations

import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from speedlm.errors import SpeedlmError
from speedlm.layers.step_hooks import after_optimizer_step
from speedlm.train.checkpoint import (
    LATEST_FILE,
    Checkpoint,
    capture_rng,
    list_checkpoints,
    load_resumable,
    save_checkpoint,
)
from speedlm.train.config import TrainConfig
from speedlm.train.evaluate import autocast_context, evaluate, require_tokens
from speedlm.train.hardware_peak import mfu, peak_flops
from speedlm.train.metrics import MetricsWriter, plot_losses, truncate_metrics
from speedlm.train.objective import model_loss, objective_spec, training_flops_per_token
from speedlm.train.optim import build_optimizer
from speedlm.train.schedule import lr_at

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"

# Train-config fields that change which batches or updates a step sees: changing them on
# resume gives a valid run, but not the one the checkpoint was part of.
_TRAJECTORY_FIELDS = ("batch_size", "seq_len", "grad_accum", "lr", "min_lr_ratio", "warmup_steps", "steps", "weight_decay", "grad_clip", "seed", "segments", "flop_budget")

__all__ = ["TrainConfig", "Trainer", "train", "evaluate", "METRICS_FILE", "PLOT_FILE"]


class _DeferredInterrupt:
    """First Ctrl-C: finish the current step, then stop (the loop checks `requested`), so a
    checkpoint never holds a half-applied optimizer update. A second Ctrl-C raises at once.
    Only installable from the main thread; elsewhere it does nothing."""

    def __init__(self):
        self.requested = False
        self._old = None

    def _handler(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, self._old)  # the next Ctrl-C behaves normally
        print("\ninterrupt: finishing this step and saving a checkpoint (Ctrl-C again to stop now)", file=sys.stderr)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._old is not None and not self.requested:
            signal.signal(signal.SIGINT, self._old)
        return False


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def frozen_names(model) -> list[str]:
    """The parameters training leaves alone (requires_grad False): outside the optimizer and its
    checkpointed state, so a resume must freeze the same ones."""
    return [name for name, p in model.named_parameters() if not p.requires_grad]


def _check_same_objective(state: dict, path, model, objective) -> None:
    """A resumed run minimises what the checkpointed one did, over the same parameters."""
    saved, now = state.get("objective"), objective_spec(objective)
    if saved != now:
        raise SpeedlmError(
            f"checkpoint {path} was trained with objective {saved or 'the model loss'}, not {now or 'the model loss'}; "
            "resume with the same objective (a distillation's teacher is not saved with the student)"
        )
    saved_frozen, frozen = state.get("frozen", []), frozen_names(model)
    if set(saved_frozen) != set(frozen):
        raise SpeedlmError(
            f"checkpoint {path} was trained with {len(saved_frozen)} frozen parameters, this model has {len(frozen)} "
            f"(first difference: {sorted(set(saved_frozen) ^ set(frozen))[0]}); freeze the same ones to resume"
        )


def _resume_from(out_dir: Path, model, optimizer, cfg: TrainConfig, tokenizer, ckpt: Checkpoint | None, parallel=None,
                 objective=model_loss):
    """Restore model, optimizer and RNG from `ckpt` (read here from `out_dir` when the caller has
    not read it already); returns (its trainer_state, its folder). Under FSDP the weights were
    restored before sharding and the optimizer state is distributed like its parameters."""
    if ckpt is None:
        ckpt = load_resumable(out_dir)
    if ckpt.config is not None and ckpt.config.to_dict() != model.config.to_dict():
        saved, now = ckpt.config.to_dict(), model.config.to_dict()
        diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        raise SpeedlmError(
            f"checkpoint {ckpt.path} was trained with a different model config (differs in {diff}); "
            "build the model from the checkpoint's config.json"
        )
    state = ckpt.trainer_state
    _check_same_objective(state, ckpt.path, model, objective)
    saved_tok = state.get("tokenizer")
    if tokenizer is not None and saved_tok is not None and tokenizer.spec() != saved_tok:
        raise SpeedlmError(f"checkpoint {ckpt.path} was trained with a different tokenizer; pass the one saved in it")
    old_cfg = state.get("train_config", {})
    changed = [k for k in _TRAJECTORY_FIELDS if k in old_cfg and old_cfg[k] != getattr(cfg, k)]
    if changed:
        warnings.warn(
            f"resuming with changed {changed}: the run continues, but not as the original run would have",
            stacklevel=5,  # the caller of train()
        )
    sharded = parallel is not None and parallel.kind == "fsdp"
    if not sharded:
        ckpt.restore_model(model)
    from functools import partial

    from speedlm.train.distributed import load_full_optimizer_state

    ckpt.restore_optimizer(optimizer, partial(load_full_optimizer_state, model, optimizer) if sharded else None)
    ckpt.restore_rng()
    return state, ckpt.path


def _check_options(model, cfg: TrainConfig, val_ids, tokenizer, stop_at_step: int | None, parallel) -> None:
    """The refusals that need nothing built yet."""
    cfg.validate()
    cfg.check_model(model)
    parallel.check_batch(cfg.batch_size)
    if tokenizer is not None:
        model.config.check_vocab(tokenizer.vocab_size)
    if val_ids is not None:  # with memory, every row of a validation batch reads its own part of the stream
        require_tokens(len(val_ids), cfg.seq_len * (cfg.batch_size if cfg.segments else 1), "validation set")
    if stop_at_step is not None and stop_at_step < 0:
        raise SpeedlmError(f"stop_at_step must be >= 0, got {stop_at_step}")
    if not any(p.requires_grad for p in model.parameters()):
        raise SpeedlmError("every parameter of the model is frozen (requires_grad False): there is nothing to train")


def _check_modes(model, cfg: TrainConfig, parallel) -> None:
    """Segment mode, reversible layers, activation checkpointing, compile and FSDP: the pairs
    that cannot run together."""
    if cfg.segments and cfg.activation_checkpointing:
        raise SpeedlmError("--segments runs its blocks with caches, which activation checkpointing skips; drop one of them")
    if cfg.segments and getattr(model.config, "reversible", False):
        raise SpeedlmError("--segments runs with caches, where reversible layers keep every activation; drop one of them")
    if getattr(model.config, "reversible", False):
        # a reversible stack calls its blocks' branches, not their forward: what wraps a block's
        # forward would never run (and the stack already recomputes activations)
        if cfg.activation_checkpointing:
            raise SpeedlmError("reversible layers already recompute their activations; drop --activation-checkpointing")
        if parallel.kind == "fsdp" or cfg.compile:
            raise SpeedlmError("reversible layers run under DDP or one process, without --compile; FSDP and compile wrap "
                               "block forwards, which a reversible stack does not call")


class _ThroughputWindows:
    """Training tokens and seconds between logged steps, for tokens/s. Validation and saving
    are not training time: the log restarts the window after validating, `exclude` moves its
    start past a save. The first window pays for warm-up (allocator, thread pool, kernel
    selection): the summary's tokens/s leaves it out when later windows exist (it is still
    logged)."""

    def __init__(self):
        self.t0, self.tokens = time.perf_counter(), 0  # the open window
        self.warmup_s, self.warmup_tokens, self.in_warmup = 0.0, 0, True  # the first window
        self.seconds, self.counted_tokens = 0.0, 0  # every later window

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def close(self) -> float:
        """Close the open window; returns its tokens/s."""
        window_s = time.perf_counter() - self.t0
        if self.in_warmup:
            self.warmup_s, self.warmup_tokens, self.in_warmup = window_s, self.tokens, False
        else:
            self.seconds += window_s
            self.counted_tokens += self.tokens
        return self.tokens / window_s if window_s > 0 else 0.0

    def restart(self) -> None:
        self.t0, self.tokens = time.perf_counter(), 0

    def exclude(self, seconds: float) -> None:
        self.t0 += seconds

    def tok_per_s(self) -> float:
        """Over the windows after the first, or the first when it is all there is."""
        seconds, tokens = self.seconds, self.counted_tokens
        if seconds == 0.0:
            seconds, tokens = self.warmup_s, self.warmup_tokens
        return tokens / seconds if seconds > 0 else 0.0


@dataclass
class _StepSums:
    """What one optimizer step leaves for its log record: sums over the micro-batches, kept on
    the device (reading one, `.item()`, forces a sync, so only log steps do)."""

    lr: float
    loss: torch.Tensor
    parts: dict = field(default_factory=dict)  # the named parts of the loss
    metrics: dict = field(default_factory=dict)  # numbers the modules report that are not losses
    grad_norm: torch.Tensor | None = None

    def add(self, out) -> None:
        self.loss += out.total.detach()
        for name, value in out.parts.items():
            self.parts[name] = self.parts.get(name, 0.0) + value.detach()
        for name, value in out.metrics.items():
            self.metrics[name] = self.metrics.get(name, 0.0) + value.detach()


class Trainer:
    """One training run (see `train`, the usual way in, for the arguments). `__init__` checks
    the options and builds what every step needs: device, wrapping, optimizer, and the state
    resumed from a checkpoint or freshly seeded. `run` then loops `step` (one optimizer step),
    `log` (with `validate`) and `save` until the schedule or `stop_at_step` ends it."""

    def __init__(self, model, cfg: TrainConfig, train_stream, val_ids=None, tokenizer=None,
                 resume: bool | Checkpoint = False, progress: bool = True, stop_at_step: int | None = None,
                 data_info: dict | None = None, on_step=None, persist: bool = True, parallel=None, stop_when=None,
                 objective=None):
        from speedlm.train.distributed import Parallel

        self.objective = model_loss if objective is None else objective
        self.model, self.cfg, self.train_stream, self.val_ids = model, cfg, train_stream, val_ids
        self.tokenizer, self.progress, self.data_info, self.on_step = tokenizer, progress, data_info, on_step
        self.stop_when = stop_when
        self.persist = persist
        self.parallel = parallel = parallel or Parallel()
        _check_options(model, cfg, val_ids, tokenizer, stop_at_step, parallel)
        self.device = cfg.resolve_device()
        self.amp_dtype = cfg.autocast_dtype(self.device)
        if resume and not persist:
            raise SpeedlmError("a run that persists nothing cannot resume")
        self.out_dir = Path(cfg.out_dir)
        self.writes = persist and parallel.main  # what ranks other than 0 never do
        if self.writes:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path, self.plot_path = self.out_dir / METRICS_FILE, self.out_dir / PLOT_FILE
        _check_modes(model, cfg, parallel)

        self.resume = self._prepare_model(resume)
        self.segments = self._segment_memory()
        self.optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
        if self.resume:
            self._resume()
        else:
            self._start()

        self.end = cfg.steps if stop_at_step is None else min(cfg.steps, stop_at_step)
        self.flops_tok = training_flops_per_token(self.objective, model, cfg.seq_len)  # as the model is now
        self.dynamic_flops = model.data_dependent_flops
        if self.flops_spent is None:
            self.flops_spent = self.start * cfg.tokens_per_step * self.flops_tok
        self.peak, self.peak_source = peak_flops(self.device, self.amp_dtype or torch.float32, given=cfg.peak_flops)
        if cfg.peak_flops is None:
            self.peak *= parallel.world_size  # tokens/s counts every rank's tokens: so does the peak
        self.warned_peak = False
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")  # inf: measure, never scale
        self.best_val = self.last_metrics.get("best_val_loss")

        self.steps_done = self.start  # completed optimizer steps
        self.rng_at_step = capture_rng()  # RNG state at the boundary after `steps_done`, what a checkpoint stores
        self.last_saved = self.start if self.resumed_from is not None else None
        self.last_ckpt = self.resumed_from
        self.history: list[dict] = []  # the metric records written by this run
        self.t_start = time.perf_counter()
        self.windows = _ThroughputWindows()
        self.in_update = False  # inside optimizer.step(): the weights may be half-updated

    # ----- setup

    def _prepare_model(self, resume):
        """Apply device, activation checkpointing, compile and data parallelism to the model from
        outside; returns `resume`, read here already under FSDP (full weights go in before
        sharding)."""
        model, cfg, parallel = self.model, self.cfg, self.parallel
        model.to(self.device)
        if cfg.activation_checkpointing:
            from speedlm.train.activation_checkpointing import checkpoint_blocks

            checkpoint_blocks(model)
        if cfg.compile:  # per block, from outside: the module tree and the state dict stay as they are
            for block in model.blocks:
                block.compile()
        if resume and parallel.kind == "fsdp":
            resume = resume if isinstance(resume, Checkpoint) else load_resumable(self.out_dir)
            resume.restore_model(model)
        # (x, y) -> the objective's Loss; gradients averaged under DDP, parameters sharded in place under FSDP
        self.step_loss_of = parallel.wrap(model, self.objective)
        return resume

    def _to_device(self, x, y):
        x, y = self.parallel.shard(x, y)  # this rank's rows of the global batch
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _segment_memory(self):
        """Segment mode's source of (x, y, cache) micro-batches, or None."""
        cfg = self.cfg
        if not cfg.segments:
            return None
        from speedlm.train.segments import SegmentMemory, check_segment_model

        check_segment_model(self.model, cfg.segments, cfg.seq_len)
        return SegmentMemory(self.model, self.train_stream, cfg.segments, cfg.batch_size, cfg.seq_len, cfg.seed,
                             self._to_device, lambda: autocast_context(self.device, self.amp_dtype))

    def _resume(self) -> None:
        """Continue from the checkpoint: model, optimizer, RNG, step, tokens, clock and metrics."""
        given = self.resume if isinstance(self.resume, Checkpoint) else None
        state, self.resumed_from = _resume_from(self.out_dir, self.model, self.optimizer, self.cfg, self.tokenizer,
                                                given, self.parallel, self.objective)
        self.start = int(state["step"])
        self.tokens = int(state.get("tokens", self.start * self.cfg.tokens_per_step))
        self.flops_spent = state.get("flops_spent")  # None in checkpoints from before budgets: recounted
        self.prior_elapsed = float(state.get("elapsed_s", 0.0))
        self.last_metrics = dict(state.get("metrics", {}))
        # steps after the checkpoint are trained again: drop their stale records
        if self.writes:
            truncate_metrics(self.metrics_path, self.start)

    def _start(self) -> None:
        """A fresh run, in a folder that holds no other run's checkpoints, seeded."""
        existing = list_checkpoints(self.out_dir) if self.persist else []
        if existing or (self.persist and (self.out_dir / LATEST_FILE).exists()):
            raise SpeedlmError(
                f"{self.out_dir} already holds checkpoints ({existing[-1].name if existing else LATEST_FILE}); "
                "pass resume=True to continue that run, or choose another out_dir"
            )
        _seed_everything(self.cfg.seed)
        self.start, self.tokens, self.prior_elapsed, self.last_metrics = 0, 0, 0.0, {}
        self.flops_spent = 0.0
        self.resumed_from = None

    # ----- the loop

    def run(self) -> dict:
        """Train to the end, saving on the way and at the end; returns the summary (see `train`).
        The first Ctrl-C finishes the step, saves and re-raises; a second one inside the
        optimizer update keeps the last checkpoint."""
        from speedlm.progress import progress_bar

        cfg, bar = self.cfg, None
        try:
            bar = progress_bar(total=cfg.steps, initial=self.start, disable=not (self.progress and self.parallel.main),
                               unit="step", desc="train")
            with (MetricsWriter(self.metrics_path if self.writes else os.devnull, append=self.resume) as writer,
                  _DeferredInterrupt() as interrupt):
                while self.steps_done < self.end and not self.budget_spent():
                    sums = self.step()
                    self._log_and_save(sums, writer, bar)
                    if interrupt.requested:
                        raise KeyboardInterrupt
                if self.last_saved != self.steps_done:
                    self.save(self.steps_done)
        except KeyboardInterrupt:
            if bar is not None:
                bar.close()
            if self.in_update:
                # a second Ctrl-C landed inside optimizer.step(): the weights are half-updated
                print("interrupted during an optimizer update; keeping the last saved checkpoint", file=sys.stderr)
            elif self.last_saved != self.steps_done and self.persist:
                path = self.save(self.steps_done)
                print(f"interrupted: saved checkpoint {path}", file=sys.stderr)
            raise
        finally:
            if bar is not None:
                bar.close()
        if self.writes:
            plot_losses(self.metrics_path, self.plot_path)
        return self.summary()

    def step(self) -> _StepSums:
        """One optimizer step: the scheduled lr, `grad_accum` micro-batches, clipping, the update
        and the modules' after-step hooks."""
        cfg = self.cfg
        self._recount_flops()  # this step runs at the model's cost as it is now
        lr = lr_at(self.steps_done, cfg.steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        sums = _StepSums(lr, torch.zeros((), device=self.device))
        for micro in range(cfg.grad_accum):
            index, memory = self.steps_done * cfg.grad_accum + micro, {}
            if self.segments is not None:
                x, y, memory["cache"] = self.segments.batch(index)
            else:
                x, y = self._to_device(*self.train_stream.batch(index, cfg.batch_size, cfg.seq_len, cfg.seed))
            with autocast_context(self.device, self.amp_dtype):
                out = self.step_loss_of(x, y, **memory)
            # mean over micro-batches, so grad_accum changes the batch, not the lr
            (out.total / cfg.grad_accum).backward()
            sums.add(out)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
            grad_norm = grad_norm.full_tensor()
        sums.grad_norm = grad_norm
        self.in_update = True
        self.optimizer.step()
        self.steps_done += 1
        after_optimizer_step(self.model, self.steps_done)  # e.g. Performer's feature redraw, outside any forward
        self.in_update = False
        self.optimizer.zero_grad(set_to_none=True)
        self.rng_at_step = capture_rng()
        self.tokens += cfg.tokens_per_step
        self.flops_spent += self.flops_tok * cfg.tokens_per_step
        self.windows.add(cfg.tokens_per_step)
        return sums

    def _recount_flops(self) -> None:
        if self.dynamic_flops:
            self.flops_tok = training_flops_per_token(self.objective, self.model, self.cfg.seq_len)

    def budget_spent(self) -> bool:
        """Whether the next step, at the model's cost as it is now, would pass the FLOP budget."""
        if self.cfg.flop_budget is None:
            return False
        self._recount_flops()
        return self.flops_spent + self.flops_tok * self.cfg.tokens_per_step > self.cfg.flop_budget

    def _is_last(self, step: int) -> bool:
        return step == self.end or self.budget_spent()

    def _log_and_save(self, sums: _StepSums, writer, bar) -> None:
        """After a step: progress, then a log record, validation and a checkpoint when due."""
        cfg, step = self.cfg, self.steps_done
        bar.update(1)
        if self.on_step is not None:
            self.on_step(step)
        if self.stop_when is not None and self.stop_when(step):
            self.end = step  # the caller has what it needs (e.g. a benchmark's task is solved): this step is the last
        last = self._is_last(step)
        do_eval = self.val_ids is not None and ((cfg.eval_every > 0 and step % cfg.eval_every == 0) or last)
        if do_eval or step % cfg.log_every == 0 or last:
            self.log(sums, do_eval, writer, bar)
        if cfg.save_every > 0 and step % cfg.save_every == 0 and not last:
            t_save = time.perf_counter()
            self.save(step)
            self.windows.exclude(time.perf_counter() - t_save)  # saving is not training time

    def log(self, sums: _StepSums, do_eval: bool, writer, bar) -> None:
        """Write the record of the step just done (averaged over ranks), validating first when
        `do_eval`; refuses a diverged loss."""
        cfg, step, parallel = self.cfg, self.steps_done, self.parallel
        tok_s = self.windows.close()
        loss_sum = parallel.mean(sums.loss)
        part_sums = {name: parallel.mean(v) for name, v in sums.parts.items()}
        metric_sums = {name: parallel.mean(v) for name, v in sums.metrics.items()}
        step_loss = loss_sum.item() / cfg.grad_accum
        if not math.isfinite(step_loss):
            raise SpeedlmError(
                f"training diverged: loss is {step_loss} at step {step}; "
                "lower lr, raise warmup_steps, or resume from an earlier checkpoint"
            )
        flops_s = self.flops_tok * tok_s
        record = {
            "step": step,
            "loss": step_loss,
            "lr": sums.lr,
            "grad_norm": sums.grad_norm.item(),
            "tokens": self.tokens,
            "flops": self.flops_spent,  # training FLOPs so far, at the cost each step ran at
            "tok_per_s": tok_s,
            "flops_per_s": flops_s,
            "mfu": mfu(self.flops_tok, tok_s, self.peak),
            # the named parts of the loss: "lm" (cross-entropy) and any auxiliary losses
            **{f"loss/{name}": float(v) / cfg.grad_accum for name, v in part_sums.items()},
            # numbers the modules report that are not losses (MoD's router agreement)
            **{f"metric/{name}": float(v) / cfg.grad_accum for name, v in metric_sums.items()},
        }
        if do_eval:
            record.update(self.validate())
        if flops_s > 1.05 * self.peak and not self.warned_peak and self.peak_source != "given":
            self.warned_peak = True
            warnings.warn(
                f"the model runs at {flops_s / 1e9:.1f} GFLOP/s, above the {self.peak_source} peak of "
                f"{self.peak / 1e9:.1f}: that peak was measured on a busy machine; renew it with "
                "`speedlm bench peak --remeasure` (MFU is capped at 100% meanwhile)",
                stacklevel=5,  # the caller of train()
            )
        writer.write(record)
        self.history.append(record)
        self.last_metrics = dict(record)
        bar.set_postfix(
            loss=f"{step_loss:.4f}", tok_s=f"{tok_s:,.0f}", gflop_s=f"{flops_s / 1e9:.1f}",
            mfu=f"{record['mfu']:.1%}", refresh=False,
        )
        self.windows.restart()  # eval time is not training time

    def validate(self) -> dict:
        """Validation loss and perplexity (with memory in segment mode); keeps the best loss."""
        cfg = self.cfg
        ev = evaluate(self.model, self.val_ids, cfg.batch_size, cfg.seq_len, cfg.eval_batches, self.device,
                      self.amp_dtype, memory=cfg.segments)
        self.best_val = ev["loss"] if self.best_val is None else min(self.best_val, ev["loss"])
        return {"val_loss": ev["loss"], "val_ppl": ev["ppl"]}

    def save(self, at_step: int) -> Path | None:
        """Checkpoint the state after `at_step` steps; returns its folder (None on ranks that do
        not write). Under FSDP every rank takes part in gathering the full tensors rank 0 writes."""
        from speedlm.train.distributed import gather_full

        cfg = self.cfg
        fsdp = self.parallel.kind == "fsdp" and self.persist
        to_save = gather_full(self.model, self.optimizer) if fsdp else (self.model, self.optimizer)
        if not self.writes:
            self.last_saved = at_step
            self.parallel.barrier()  # rank 0 is writing the checkpoint
            return None
        trainer_state = {
            "step": at_step,
            "data_step": at_step * cfg.grad_accum,  # next micro-batch index of train_stream
            "tokens": self.tokens,
            "flops_spent": self.flops_spent,
            "seed": cfg.seed,
            "schedule": {
                "name": "warmup_cosine",
                "lr": cfg.lr,
                "warmup_steps": cfg.warmup_steps,
                "min_lr_ratio": cfg.min_lr_ratio,
                "total_steps": cfg.steps,
            },
            "train_config": cfg.to_dict(),
            "tokenizer": self.tokenizer.spec() if self.tokenizer is not None else None,
            "data": self.data_info,
            "metrics": {**self.last_metrics, "best_val_loss": self.best_val},
            "elapsed_s": self.prior_elapsed + time.perf_counter() - self.t_start,
            "versions": {"torch": torch.__version__},
        }
        # only where they differ from a plain run, so plain checkpoints stay as they were
        if (spec := objective_spec(self.objective)) is not None:
            trainer_state["objective"] = spec
        if frozen := frozen_names(self.model):
            trainer_state["frozen"] = frozen
        extra_writer = (lambda folder: self.tokenizer.save(folder)) if self.tokenizer is not None else None
        self.last_ckpt = save_checkpoint(
            self.out_dir, at_step, *to_save, trainer_state, keep=cfg.keep,
            extra_files_writer=extra_writer, rng_state=self.rng_at_step,
        )
        self.last_saved = at_step
        self.parallel.barrier()
        return self.last_ckpt

    def summary(self) -> dict:
        tok_per_s = self.windows.tok_per_s()
        return {
            "out_dir": str(self.out_dir),
            "checkpoint": str(self.last_ckpt) if self.last_ckpt is not None else None,
            "start_step": self.start,
            "step": self.steps_done,
            "tokens": self.tokens,
            "flops_spent": self.flops_spent,
            "flops_per_token": self.flops_tok,  # at the end (it moves for data-dependent models)
            "loss": self.last_metrics.get("loss"),
            "val_loss": self.last_metrics.get("val_loss"),
            "val_ppl": self.last_metrics.get("val_ppl"),
            "best_val_loss": self.best_val,
            "tok_per_s": tok_per_s,
            "flops_per_s": self.flops_tok * tok_per_s,
            "mfu": mfu(self.flops_tok, tok_per_s, self.peak),
            "peak_flops": self.peak,
            "peak_source": self.peak_source,
            "dtype": str(self.amp_dtype or torch.float32).removeprefix("torch."),
            "elapsed_s": self.prior_elapsed + time.perf_counter() - self.t_start,
            "metrics_path": str(self.metrics_path) if self.persist else None,
            "plot_path": str(self.plot_path) if self.persist else None,
            "history": self.history,
        }


def train(
    model,
    cfg: TrainConfig,
    train_stream,
    val_ids=None,
    tokenizer=None,
    resume: bool | Checkpoint = False,
    progress: bool = True,
    stop_at_step: int | None = None,
    data_info: dict | None = None,
    on_step=None,
    persist: bool = True,
    parallel=None,
    stop_when=None,
    objective=None,
) -> dict:
    """Train `model` for `cfg.steps` optimizer steps; return a summary dict.

    train_stream: anything with `.batch(step, batch_size, seq_len, seed) -> (x, y)`, a pure
        function of (seed, step) (e.g. `speedlm.data.dataset.TokenStream`).
    val_ids: held-out token ids (1-D array) for validation, or None to skip validation.
    tokenizer: saved into every checkpoint (its `.save(folder)`, spec in trainer_state) so
        checkpoints are self-contained; its vocab_size must equal the model's.
    resume: continue from `cfg.out_dir`'s latest checkpoint (model, optimizer, step, RNG); pass
        the `Checkpoint` itself if the caller has read it already (it is not read twice).
        Without it, an out_dir that already holds checkpoints is refused rather than
        silently mixed with a new run.
    data_info: JSON-able description of the data (spec, fingerprint) stored in every
        checkpoint as trainer_state["data"], so `speedlm eval` can find the same corpus.
    stop_at_step: stop (with a checkpoint) once this many steps are done while the schedule
        still spans `cfg.steps`; for time-boxed runs and resume tests.
    on_step: called with the number of completed steps after every optimizer step (e.g. to
        drive an outer progress bar over several runs).
    stop_when: called like on_step, after it; a true result makes that step the last (logged
        and saved like the schedule's end), for callers that stop once they have what they
        measure. The learning-rate schedule still spans `cfg.steps`.
    persist: False for throw-away runs (benchmarks that train hundreds of small models): no
        checkpoints, metrics file or plot are written; the summary and history are returned.
    parallel: a `speedlm.train.distributed.Parallel` (data parallelism under torchrun): each
        rank trains on its rows of the same global batch (`cfg.batch_size`), gradients are
        averaged, losses are reported as the mean over ranks, and only rank 0 writes.
    objective: what each step minimises, `objective(model, x, y, **meta) -> Loss`
        (speedlm/train/objective.py; default: `model.loss`), under every `parallel` kind, e.g. a
        distillation objective holding a teacher (speedlm/distill/objectives.py). Its parts
        are logged as `loss/<name>`; validation still reports the model's own loss. Checkpoints
        hold the model only and record the objective's `spec()`: resuming needs the same
        objective again. Parameters with requires_grad False (set before calling) are not
        trained, not in the optimizer nor its saved state; a resume must freeze the same ones.

    Writes to `cfg.out_dir`: step_*/ checkpoints + `latest`, `metrics.jsonl`, `loss.png`.
    On KeyboardInterrupt a checkpoint of the last completed step is saved, then it re-raises.

    Summary keys: out_dir, checkpoint, start_step, step, tokens, flops_spent (training FLOPs, each
    step at the cost it ran at), flops_per_token (at the end), loss, val_loss, val_ppl,
    best_val_loss, tok_per_s, flops_per_s (achieved model FLOP/s), mfu, peak_flops, peak_source,
    dtype, elapsed_s, metrics_path,
    plot_path, history (the metric records written by this call).
    """
    return Trainer(
        model, cfg, train_stream, val_ids=val_ids, tokenizer=tokenizer, resume=resume, progress=progress,
        stop_at_step=stop_at_step, data_info=data_info, on_step=on_step, persist=persist, parallel=parallel,
        stop_when=stop_when, objective=objective,
    ).run()
