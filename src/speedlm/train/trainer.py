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
from speedlm.train.flops import mfu, peak_flops
from speedlm.train.metrics import MetricsWriter, plot_losses, truncate_metrics
from speedlm.train.optim import build_optimizer
from speedlm.train.schedule import lr_at

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"

# Train-config fields that change which batches or updates a step sees: changing them on
# resume gives a valid run, but not the one the checkpoint was part of.
_TRAJECTORY_FIELDS = ("batch_size", "seq_len", "grad_accum", "lr", "min_lr_ratio", "warmup_steps", "steps", "weight_decay", "grad_clip", "seed", "segments")

__all__ = ["TrainConfig", "train", "evaluate", "METRICS_FILE", "PLOT_FILE"]


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


def _resume_from(out_dir: Path, model, optimizer, cfg: TrainConfig, tokenizer, ckpt: Checkpoint | None, parallel=None):
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
    saved_tok = state.get("tokenizer")
    if tokenizer is not None and saved_tok is not None and tokenizer.spec() != saved_tok:
        raise SpeedlmError(f"checkpoint {ckpt.path} was trained with a different tokenizer; pass the one saved in it")
    old_cfg = state.get("train_config", {})
    changed = [k for k in _TRAJECTORY_FIELDS if k in old_cfg and old_cfg[k] != getattr(cfg, k)]
    if changed:
        warnings.warn(
            f"resuming with changed {changed}: the run continues, but not as the original run would have",
            stacklevel=3,
        )
    sharded = parallel is not None and parallel.kind == "fsdp"
    if not sharded:
        ckpt.restore_model(model)
    from functools import partial

    from speedlm.train.distributed import load_full_optimizer_state

    ckpt.restore_optimizer(optimizer, partial(load_full_optimizer_state, model, optimizer) if sharded else None)
    ckpt.restore_rng()
    return state, ckpt.path


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
    persist: False for throw-away runs (benchmarks that train hundreds of small models): no
        checkpoints, metrics file or plot are written; the summary and history are returned.
    parallel: a `speedlm.train.distributed.Parallel` (data parallelism under torchrun): each
        rank trains on its rows of the same global batch (`cfg.batch_size`), gradients are
        averaged, losses are reported as the mean over ranks, and only rank 0 writes.

    Writes to `cfg.out_dir`: step_*/ checkpoints + `latest`, `metrics.jsonl`, `loss.png`.
    On KeyboardInterrupt a checkpoint of the last completed step is saved, then it re-raises.

    Summary keys: out_dir, checkpoint, start_step, step, tokens, loss, val_loss, val_ppl,
    best_val_loss, tok_per_s, flops_per_s (achieved model FLOP/s), mfu, peak_flops, peak_source,
    dtype, elapsed_s, metrics_path,
    plot_path, history (the metric records written by this call).
    """
    from speedlm.train.distributed import Parallel

    parallel = parallel or Parallel()
    cfg.validate()
    cfg.check_model(model)
    parallel.check_batch(cfg.batch_size)
    if tokenizer is not None:
        model.config.check_vocab(tokenizer.vocab_size)
    if val_ids is not None:  # with memory, every row of a validation batch reads its own part of the stream
        require_tokens(len(val_ids), cfg.seq_len * (cfg.batch_size if cfg.segments else 1), "validation set")
    if stop_at_step is not None and stop_at_step < 0:
        raise SpeedlmError(f"stop_at_step must be >= 0, got {stop_at_step}")
    device = cfg.resolve_device()
    amp_dtype = cfg.autocast_dtype(device)
    if resume and not persist:
        raise SpeedlmError("a run that persists nothing cannot resume")
    out_dir = Path(cfg.out_dir)
    writes = persist and parallel.main  # what ranks other than 0 never do
    if writes:
        out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path, plot_path = out_dir / METRICS_FILE, out_dir / PLOT_FILE

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
    model.to(device)
    if cfg.activation_checkpointing:
        from speedlm.train.activation_checkpointing import checkpoint_blocks

        checkpoint_blocks(model)
    if cfg.compile:  # per block, from outside: the module tree and the state dict stay as they are
        for block in model.blocks:
            block.compile()
    if resume and parallel.kind == "fsdp":  # full weights go in before sharding
        resume = resume if isinstance(resume, Checkpoint) else load_resumable(out_dir)
        resume.restore_model(model)
    # (x, y) -> Loss; gradients averaged under DDP, parameters sharded in place under FSDP
    step_loss_of = parallel.wrap(model)

    def to_device(x, y):
        x, y = parallel.shard(x, y)  # this rank's rows of the global batch
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    segments = None
    if cfg.segments:
        from speedlm.train.segments import SegmentMemory, check_segment_model

        check_segment_model(model, cfg.segments, cfg.seq_len)
        segments = SegmentMemory(model, train_stream, cfg.segments, cfg.batch_size, cfg.seq_len, cfg.seed, to_device,
                                 lambda: autocast_context(device, amp_dtype))
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)

    if resume:
        given = resume if isinstance(resume, Checkpoint) else None
        state, resumed_from = _resume_from(out_dir, model, optimizer, cfg, tokenizer, given, parallel)
        start = int(state["step"])
        tokens = int(state.get("tokens", start * cfg.tokens_per_step))
        prior_elapsed = float(state.get("elapsed_s", 0.0))
        last_metrics = dict(state.get("metrics", {}))
        # steps after the checkpoint are trained again: drop their stale records
        if writes:
            truncate_metrics(metrics_path, start)
    else:
        existing = list_checkpoints(out_dir) if persist else []
        if existing or (persist and (out_dir / LATEST_FILE).exists()):
            raise SpeedlmError(
                f"{out_dir} already holds checkpoints ({existing[-1].name if existing else LATEST_FILE}); "
                "pass resume=True to continue that run, or choose another out_dir"
            )
        _seed_everything(cfg.seed)
        start, tokens, prior_elapsed, last_metrics = 0, 0, 0.0, {}
        resumed_from = None

    end = cfg.steps if stop_at_step is None else min(cfg.steps, stop_at_step)
    flops_tok = model.flops_per_token(cfg.seq_len, training=True)
    peak, peak_source = peak_flops(device, amp_dtype or torch.float32, given=cfg.peak_flops)
    if cfg.peak_flops is None:
        peak *= parallel.world_size  # tokens/s counts every rank's tokens: so does the peak
    warned_peak = False
    params = [p for p in model.parameters() if p.requires_grad]
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")  # inf: measure, never scale
    extra_writer = (lambda folder: tokenizer.save(folder)) if tokenizer is not None else None
    best_val = last_metrics.get("best_val_loss")

    step = start  # completed optimizer steps
    rng_at_step = capture_rng()  # RNG state at the boundary after `step`, what a checkpoint stores
    last_saved = start if resumed_from is not None else None
    last_ckpt = resumed_from
    history: list[dict] = []
    t_start = time.perf_counter()
    train_time, call_tokens = 0.0, 0
    # the first logged window pays for warm-up (allocator, thread pool, kernel selection): the
    # summary's tokens/s leaves it out when later windows exist (it is still logged)
    warmup_window = {"s": 0.0, "tokens": 0, "open": True}
    window_t0, window_tokens = time.perf_counter(), 0
    in_update = False

    def save(at_step: int) -> Path | None:
        nonlocal last_saved, last_ckpt
        from speedlm.train.distributed import gather_full

        # under FSDP every rank takes part in gathering the full tensors that rank 0 writes
        to_save = gather_full(model, optimizer) if parallel.kind == "fsdp" and persist else (model, optimizer)
        if not writes:
            last_saved = at_step
            parallel.barrier()  # rank 0 is writing the checkpoint
            return None
        trainer_state = {
            "step": at_step,
            "data_step": at_step * cfg.grad_accum,  # next micro-batch index of train_stream
            "tokens": tokens,
            "seed": cfg.seed,
            "schedule": {
                "name": "warmup_cosine",
                "lr": cfg.lr,
                "warmup_steps": cfg.warmup_steps,
                "min_lr_ratio": cfg.min_lr_ratio,
                "total_steps": cfg.steps,
            },
            "train_config": cfg.to_dict(),
            "tokenizer": tokenizer.spec() if tokenizer is not None else None,
            "data": data_info,
            "metrics": {**last_metrics, "best_val_loss": best_val},
            "elapsed_s": prior_elapsed + time.perf_counter() - t_start,
            "versions": {"torch": torch.__version__},
        }
        last_ckpt = save_checkpoint(
            out_dir, at_step, *to_save, trainer_state, keep=cfg.keep,
            extra_files_writer=extra_writer, rng_state=rng_at_step,
        )
        last_saved = at_step
        parallel.barrier()
        return last_ckpt

    bar = None
    try:
        from speedlm.progress import progress_bar

        bar = progress_bar(total=cfg.steps, initial=start, disable=not (progress and parallel.main), unit="step", desc="train")
        with MetricsWriter(metrics_path if writes else os.devnull, append=resume) as writer, _DeferredInterrupt() as interrupt:
            while step < end:
                lr = lr_at(step, cfg.steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                model.train()
                # summed on device: reading it (.item()) forces a sync, so only at log steps
                loss_sum = torch.zeros((), device=device)
                part_sums: dict[str, torch.Tensor] = {}
                metric_sums: dict[str, torch.Tensor] = {}
                for micro in range(cfg.grad_accum):
                    index, memory = step * cfg.grad_accum + micro, {}
                    if segments is not None:
                        x, y, memory["cache"] = segments.batch(index)
                    else:
                        x, y = to_device(*train_stream.batch(index, cfg.batch_size, cfg.seq_len, cfg.seed))
                    with autocast_context(device, amp_dtype):
                        out = step_loss_of(x, y, **memory)
                        loss, parts = out.total, out.parts
                    # mean over micro-batches, so grad_accum changes the batch, not the lr
                    (loss / cfg.grad_accum).backward()
                    loss_sum += loss.detach()
                    for name, value in parts.items():
                        part_sums[name] = part_sums.get(name, 0.0) + value.detach()
                    for name, value in out.metrics.items():
                        metric_sums[name] = metric_sums.get(name, 0.0) + value.detach()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
                if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
                    grad_norm = grad_norm.full_tensor()
                in_update = True
                optimizer.step()
                step += 1
                after_optimizer_step(model, step)  # e.g. Performer's feature redraw, outside any forward
                in_update = False
                optimizer.zero_grad(set_to_none=True)
                rng_at_step = capture_rng()
                tokens += cfg.tokens_per_step
                window_tokens += cfg.tokens_per_step
                bar.update(1)
                if on_step is not None:
                    on_step(step)

                do_eval = val_ids is not None and ((cfg.eval_every > 0 and step % cfg.eval_every == 0) or step == end)
                if do_eval or step % cfg.log_every == 0 or step == end:
                    now = time.perf_counter()
                    window_s = now - window_t0
                    if warmup_window["open"]:
                        warmup_window.update(s=window_s, tokens=window_tokens, open=False)
                    else:
                        train_time += window_s
                        call_tokens += window_tokens
                    tok_s = window_tokens / window_s if window_s > 0 else 0.0
                    loss_sum = parallel.mean(loss_sum)
                    part_sums = {name: parallel.mean(v) for name, v in part_sums.items()}
                    metric_sums = {name: parallel.mean(v) for name, v in metric_sums.items()}
                    step_loss = loss_sum.item() / cfg.grad_accum
                    if not math.isfinite(step_loss):
                        raise SpeedlmError(
                            f"training diverged: loss is {step_loss} at step {step}; "
                            "lower lr, raise warmup_steps, or resume from an earlier checkpoint"
                        )
                    record = {
                        "step": step,
                        "loss": step_loss,
                        "lr": lr,
                        "grad_norm": grad_norm.item(),
                        "tokens": tokens,
                        "tok_per_s": tok_s,
                        "flops_per_s": flops_tok * tok_s,
                        "mfu": mfu(flops_tok, tok_s, peak),
                        # the named parts of the loss: "lm" (cross-entropy) and any auxiliary losses
                        **{f"loss/{name}": float(v) / cfg.grad_accum for name, v in part_sums.items()},
                        # numbers the modules report that are not losses (MoD's router agreement)
                        **{f"metric/{name}": float(v) / cfg.grad_accum for name, v in metric_sums.items()},
                    }
                    if do_eval:
                        ev = evaluate(model, val_ids, cfg.batch_size, cfg.seq_len, cfg.eval_batches, device, amp_dtype,
                                      memory=cfg.segments)
                        record.update(val_loss=ev["loss"], val_ppl=ev["ppl"])
                        best_val = ev["loss"] if best_val is None else min(best_val, ev["loss"])
                    if flops_tok * tok_s > 1.05 * peak and not warned_peak and peak_source != "given":
                        warned_peak = True
                        warnings.warn(
                            f"the model runs at {flops_tok * tok_s / 1e9:.1f} GFLOP/s, above the {peak_source} peak of "
                            f"{peak / 1e9:.1f}: that peak was measured on a busy machine; renew it with "
                            "`speedlm bench peak --remeasure` (MFU is capped at 100% meanwhile)",
                            stacklevel=2,
                        )
                    writer.write(record)
                    history.append(record)
                    last_metrics = dict(record)
                    bar.set_postfix(
                        loss=f"{step_loss:.4f}", tok_s=f"{tok_s:,.0f}", gflop_s=f"{flops_tok * tok_s / 1e9:.1f}",
                        mfu=f"{record['mfu']:.1%}", refresh=False,
                    )
                    window_t0, window_tokens = time.perf_counter(), 0  # eval time is not training time

                if cfg.save_every > 0 and step % cfg.save_every == 0 and step < end:
                    t_save = time.perf_counter()
                    save(step)
                    window_t0 += time.perf_counter() - t_save  # saving is not training time
                if interrupt.requested:
                    raise KeyboardInterrupt
            if last_saved != step:
                save(step)
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        if in_update:
            # a second Ctrl-C landed inside optimizer.step(): the weights are half-updated
            print("interrupted during an optimizer update; keeping the last saved checkpoint", file=sys.stderr)
        elif last_saved != step and persist:
            path = save(step)
            print(f"interrupted: saved checkpoint {path}", file=sys.stderr)
        raise
    finally:
        if bar is not None:
            bar.close()

    if writes:
        plot_losses(metrics_path, plot_path)
    if train_time == 0.0:  # a single window: it is all there is
        train_time, call_tokens = warmup_window["s"], warmup_window["tokens"]
    tok_per_s = call_tokens / train_time if train_time > 0 else 0.0
    return {
        "out_dir": str(out_dir),
        "checkpoint": str(last_ckpt) if last_ckpt is not None else None,
        "start_step": start,
        "step": step,
        "tokens": tokens,
        "loss": last_metrics.get("loss"),
        "val_loss": last_metrics.get("val_loss"),
        "val_ppl": last_metrics.get("val_ppl"),
        "best_val_loss": best_val,
        "tok_per_s": tok_per_s,
        "flops_per_s": flops_tok * tok_per_s,
        "mfu": mfu(flops_tok, tok_per_s, peak),
        "peak_flops": peak,
        "peak_source": peak_source,
        "dtype": str(amp_dtype or torch.float32).removeprefix("torch."),
        "elapsed_s": prior_elapsed + time.perf_counter() - t_start,
        "metrics_path": str(metrics_path) if persist else None,
        "plot_path": str(plot_path) if persist else None,
        "history": history,
    }
