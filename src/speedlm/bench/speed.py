"""Speed / memory benchmark: every preset at every length, in one process, on the same inputs.

For each (preset, length): forward latency (no grad), forward+backward latency
(`model.loss(x, y).backward()`), per-token decode latency (prefill `length` tokens through the
cache, then `decode_tokens` single-token steps: the median step) and the peak memory of each; plus the analytic
parameter count, FLOPs per token and inference-state bytes. Then log-log scaling exponents per
preset and time ratios against a baseline preset.

Outputs in `out_dir`: bench_speed.json (raw numbers + environment), bench_speed.md (tables),
bench_speed_time.png and bench_speed_memory.png (log-log plots).
"""

from __future__ import annotations

import datetime
import gc
import os
import platform
import time
from typing import Callable

import torch

import speedlm
from speedlm.bench import report
from speedlm.bench.common import (
    build_seeded, check_int, check_ints, check_presets, one_line, resolve_dtype, text_token_ids, write_results,
)
from speedlm.bench.memory import PeakMemory, is_oom, memory_method
from speedlm.bench.plots import write_plots
from speedlm.bench.timing import median, synchronize, time_fn, timing_method
from speedlm.device import resolve_device
from speedlm.errors import SpeedlmError
from speedlm.checkpoint.pretrained import spec_config
from speedlm.progress import progress_bar

METRICS = ("fwd", "fwd_bwd", "decode")


# ----- one measurement -----
def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(
    fn: Callable,
    device: torch.device,
    *,
    repeats: int,
    warmup: int,
    setup: Callable | None = None,
    setup_in_memory_region: bool = False,
    per: int = 1,
) -> dict:
    """Time `fn(setup())` (median of `repeats` after `warmup`; `setup` untimed), then run it
    once more for peak memory. `setup_in_memory_region`: the state `setup` builds (e.g. a
    prefilled cache) counts towards the peak, its transient allocations do not.
    Out-of-memory -> {"status": "skipped", ...}; any other error propagates."""
    try:
        samples = time_fn(fn, device, repeats=repeats, warmup=warmup, setup=setup)
        if setup is not None and not setup_in_memory_region:
            state = setup()
            with PeakMemory(device) as pm:
                out = fn(state)
                del out
            del state
        else:
            with PeakMemory(device) as pm:
                state = setup() if setup is not None else None
                pm.mark()
                out = fn(state)
                del out, state
        ms = [1000.0 * s / per for s in samples]
        return {"status": "ok", "ms": median(ms), "samples_ms": ms, "peak_bytes": pm.peak_bytes}
    except Exception as e:  # noqa: BLE001 - only OOM is swallowed, see below
        if not is_oom(e):
            raise
        reason = one_line(e)
    _free(device)
    return {"status": "skipped", "oom": True, "reason": reason}


def _skipped(reason: str, oom: bool = False) -> dict:
    return {"status": "skipped", "oom": oom, "reason": reason}


def _supports_decoding(model) -> bool:
    # an encoder (no init_cache) has no decoding, whatever its mixers support
    return hasattr(model, "init_cache") and all(b.supports_decoding for b in model.blocks)


def bench_one(model, x, y, decode_ids, device, *, repeats: int, warmup: int) -> dict:
    """The three measurements for one model and one input batch."""
    metrics = {}

    def fwd(_):
        with torch.no_grad():
            return model(x)

    metrics["fwd"] = measure(fwd, device, repeats=repeats, warmup=warmup)

    def zero_grad():
        model.zero_grad(set_to_none=True)

    y = getattr(model, "benchmark_targets", lambda t: t)(y)  # an encoder's batch: one label per row

    def fwd_bwd(_):
        model.loss(x, y).total.backward()

    metrics["fwd_bwd"] = measure(fwd_bwd, device, repeats=repeats, warmup=warmup, setup=zero_grad)
    model.zero_grad(set_to_none=True)

    n_dec = decode_ids.shape[1]
    if n_dec == 0:
        metrics["decode"] = _skipped("decode_tokens=0")
    elif not _supports_decoding(model):
        metrics["decode"] = _skipped("this model (or one of its mixers) has no cached decoding")
    else:

        def prefill():
            cache = model.init_cache()
            with torch.no_grad():
                logits = model(x, cache)
            del logits
            return cache

        calls: list[list[float]] = []  # seconds of each single-token step, one list per call

        def decode(cache):
            steps = []
            with torch.no_grad():
                for i in range(n_dec):
                    synchronize(device)
                    t0 = time.perf_counter()
                    model(decode_ids[:, i : i + 1], cache)
                    synchronize(device)
                    steps.append(time.perf_counter() - t0)
            calls.append(steps)

        metrics["decode"] = measure(
            decode, device, repeats=repeats, warmup=warmup, setup=prefill, setup_in_memory_region=True, per=n_dec
        )
        if metrics["decode"]["status"] == "ok":
            # per-token latency: the median single step of the timed calls (time_fn's warm-up
            # calls come first, measure's profiled memory run last); one preempted step moves a
            # mean of 16 steps by several percent, the median not at all
            timed = [1000.0 * dt for steps in calls[warmup : warmup + repeats] for dt in steps]
            metrics["decode"].update(ms=median(timed), step_ms=timed)
    _free(device)
    return metrics


# ----- the benchmark -----
def run_speed_bench(
    presets: list[str],
    lengths: list[int],
    batch_size: int = 1,
    device="auto",
    dtype="auto",
    decode_tokens: int = 32,
    repeats: int = 3,
    warmup: int = 1,
    out_dir: str = "runs/bench",
    progress: bool = True,
    baseline: str | None = None,
    seed: int = 0,
) -> dict:
    """Benchmark `presets` at every length in `lengths` (see module docstring); print the
    Markdown tables, write bench_speed.{json,md} and two PNGs to `out_dir`, return the JSON dict
    (plus "files": paths written). Models whose max_seq_len is below max(lengths) +
    decode_tokens get it raised to fit. Raises SpeedlmError for bad arguments/unknown presets."""
    presets = check_presets(presets)
    lengths = check_ints("lengths", lengths)
    batch_size = check_int("batch_size", batch_size, 1)
    decode_tokens = check_int("decode_tokens", decode_tokens, 0)
    repeats = check_int("repeats", repeats, 1)
    warmup = check_int("warmup", warmup, 0)
    baseline = presets[0] if baseline is None else baseline
    if baseline not in presets:
        raise SpeedlmError(f"baseline {baseline!r} is not one of the benchmarked presets {presets}")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    configs = {p: spec_config(p) for p in presets}  # unknown presets fail here, before any work
    need_len = max(lengths) + decode_tokens

    # the same token ids for every preset, real text: one batch per length (+1 token for the
    # targets), then the decoding tokens
    ids = {n: text_token_ids((batch_size, n + 1), seed + i) for i, n in enumerate(lengths)}
    dec = text_token_ids((batch_size, max(1, decode_tokens)), seed + len(lengths))[:, :decode_tokens]

    meta = {
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine() or "cpu"),
        "torch_version": torch.__version__,
        "speedlm_version": speedlm.__version__,
        "python": platform.python_version(),
        "dtype": str(dt).removeprefix("torch."),
        "batch_size": batch_size,
        "decode_tokens": decode_tokens,
        "repeats": repeats,
        "warmup": warmup,
        "lengths": lengths,
        "presets": presets,
        "seed": seed,
        "threads": torch.get_num_threads(),
        "timing_method": timing_method(dev),
        "memory_method": memory_method(dev),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    models: dict[str, dict] = {}
    rows: list[dict] = []
    bar = progress_bar(total=len(presets) * len(lengths), desc="bench speed", disable=not progress, unit="run")
    try:
        for p in presets:
            cfg = configs[p]
            bar.set_postfix_str(f"{p} (building)")
            try:
                model = build_seeded(p, seed, dev, dt, min_seq_len=need_len)
            except Exception as e:  # noqa: BLE001
                if not is_oom(e):
                    raise
                reason = "building the model: " + one_line(e)
                _free(dev)
                models[p] = {"config": cfg.to_dict(), "skipped": reason}
                for n in lengths:
                    rows.append(_row_without_model(p, n, reason))
                    bar.update()
                continue
            vocab = model.config.vocab_size
            models[p] = {
                "config": model.config.to_dict(),
                "params": model.num_params(),
                "params_non_embedding": model.num_params(non_embedding=True),
                "max_seq_len_raised_to": need_len if need_len > cfg.max_seq_len else None,
            }
            if p == presets[0] and warmup > 0:
                # one untimed pass of everything (incl. a profiler session) so that one-off
                # process start-up costs do not land on the first preset's numbers
                seq = (ids[lengths[0]] % vocab).to(dev)
                bench_one(model, seq[:, :-1], seq[:, 1:], (dec % vocab).to(dev), dev, repeats=1, warmup=0)
            for n in lengths:
                bar.set_postfix_str(f"{p} T={n}")
                seq = (ids[n] % vocab).to(dev)
                metrics = bench_one(
                    model, seq[:, :-1], seq[:, 1:], (dec % vocab).to(dev), dev, repeats=repeats, warmup=warmup
                )
                rows.append(
                    {
                        "preset": p,
                        "length": n,
                        "params": model.num_params(),
                        "gflop_per_token_fwd": model.flops_per_token(n, training=False) / 1e9,
                        "gflop_per_token_train": model.flops_per_token(n, training=True) / 1e9,
                        "state_bytes": int(model.state_bytes(n, batch_size, torch.tensor([], dtype=dt).element_size())),
                        "metrics": metrics,
                    }
                )
                bar.update()
            del model
            _free(dev)
    finally:
        bar.close()

    result = {
        "meta": meta,
        "baseline": baseline,
        "models": models,
        "results": rows,
        "exponents": report.exponents(rows, presets),
        "ratios": report.ratios(rows, presets, baseline),
    }
    os.makedirs(out_dir, exist_ok=True)
    md = report.markdown(result)
    files = {
        "json": os.path.join(out_dir, "bench_speed.json"),
        "md": os.path.join(out_dir, "bench_speed.md"),
    }
    subtitle = f"{meta['device']} {meta['dtype']} batch {batch_size}"
    files.update(write_plots(rows, presets, out_dir, subtitle))
    return write_results(result, md, files)


def _row_without_model(preset: str, length: int, reason: str) -> dict:
    return {
        "preset": preset,
        "length": length,
        "params": None,
        "gflop_per_token_fwd": None,
        "gflop_per_token_train": None,
        "state_bytes": None,
        "metrics": {m: _skipped(reason, oom=True) for m in METRICS},
    }
