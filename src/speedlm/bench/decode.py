"""Decode latency vs context, interleaved: does a token cost the same after 16k tokens as after 1k?

For each preset, one cache per context length is prefilled (untimed) with the same random
tokens; then the single-token steps alternate between the caches (step i on every cache,
in a rotating order) and each step is timed on its own. The per-context latency is the median
of its steps, and the ratio to the shortest context is taken step against step in one process,
so a machine that slows down for a minute slows every context alike. (`bench speed` measures
each length minutes apart: its decode ratios carry the drift of a shared machine.)

Outputs in `out_dir`: bench_decode.json and bench_decode.md.
"""

from __future__ import annotations

import datetime
import os
import platform
import time

import torch

import speedlm
from speedlm.bench.common import build_seeded, check_int, check_ints, check_presets, resolve_dtype, write_results
from speedlm.bench.timing import median, synchronize, timing_method
from speedlm.device import resolve_device
from speedlm.models import resolve_config
from speedlm.progress import progress_bar


def _decode_rows(model, contexts: list[int], steps: int, gen: torch.Generator, dev) -> dict[int, list[float]]:
    vocab = model.config.vocab_size
    longest = max(contexts)
    ids = torch.randint(0, vocab, (1, longest + steps + 1), generator=gen).to(dev)
    caches = {}
    with torch.no_grad():
        for n in contexts:  # the same prefix for every context: the caches differ only in length
            caches[n] = model.init_cache()
            model(ids[:, :n], caches[n])
        times: dict[int, list[float]] = {n: [] for n in contexts}
        for i in range(steps + 1):
            order = contexts[i % len(contexts):] + contexts[: i % len(contexts)]  # rotate who goes first
            for n in order:
                tok = ids[:, n + i : n + i + 1]
                synchronize(dev)
                t0 = time.perf_counter()
                model(tok, caches[n])
                synchronize(dev)
                if i:  # step 0 is a warm-up on every cache
                    times[n].append(1000.0 * (time.perf_counter() - t0))
    return times


def decode_markdown(result: dict) -> str:
    meta, base = result["meta"], result["meta"]["contexts"][0]
    ctx = meta["contexts"]
    head = "| preset | " + " | ".join(f"ms/token @{n}" for n in ctx) + " | " + " | ".join(
        f"@{n} / @{base}" for n in ctx[1:]) + " | state bytes @" + f"{ctx[-1]} |"
    lines = [
        "# speedlm decode benchmark",
        "",
        f"- device: {meta['device']}, torch {meta['torch_version']}, dtype {meta['dtype']}, batch 1, "
        f"{meta['threads']} CPU threads; {meta['timing_method']}",
        f"- {meta['steps']} single-token steps per context after one warm-up step, interleaved across the "
        "contexts in a rotating order; ms/token = median step; ratios of those medians, measured in one process",
        f"- date: {meta['date']}",
        "",
        head,
        "|" + "---|" * (1 + 2 * len(ctx)),
    ]
    for p, r in result["presets"].items():
        if "skipped" in r:
            lines.append(f"| {p} | skipped: {r['skipped']} |")
            continue
        ms = [r["ms"][str(n)] for n in ctx]
        ratios = [r["ratio"][str(n)] for n in ctx[1:]]
        lines.append(f"| {p} | " + " | ".join(f"{m:.3g}" for m in ms) + " | "
                     + " | ".join(f"{x:.2f}" for x in ratios) + f" | {r['state_bytes']:,} |")
    return "\n".join(lines) + "\n"


def run_decode_bench(presets, contexts=(1024, 16384), steps: int = 64, device="auto", dtype="auto", seed: int = 0,
                     out_dir: str = "runs/bench", progress: bool = True) -> dict:
    """Per-token decode latency of each preset at each context (see module doc); prints the
    table, writes bench_decode.{json,md} to `out_dir` and returns the JSON dict."""
    presets = check_presets(presets)
    contexts = sorted(set(check_ints("contexts", contexts)))
    steps = check_int("steps", steps, 1)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    from speedlm.models.build import require_language_model

    for p in presets:
        require_language_model(resolve_config(p), p)  # unknown presets and encoders fail before any work
    need = max(contexts) + steps + 1
    meta = {
        "device": str(dev), "torch_version": torch.__version__, "speedlm_version": speedlm.__version__,
        "python": platform.python_version(), "dtype": str(dt).removeprefix("torch."), "contexts": contexts,
        "steps": steps, "presets": presets, "seed": seed, "threads": torch.get_num_threads(),
        "timing_method": timing_method(dev),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    out: dict[str, dict] = {}
    bar = progress_bar(total=len(presets), desc="bench decode", disable=not progress, unit="preset")
    try:
        for p in presets:
            bar.set_postfix_str(p)
            model = build_seeded(p, seed, dev, dt, min_seq_len=need).eval()
            if not all(b.supports_decoding for b in model.blocks):
                # a row, not an error: the presets measured before it are kept
                out[p] = {"skipped": "a mixer of this model does not support cached decoding"}
                bar.update()
                continue
            times = _decode_rows(model, contexts, steps, torch.Generator().manual_seed(seed), dev)
            ms = {n: median(times[n]) for n in contexts}
            out[p] = {
                "ms": {str(n): ms[n] for n in contexts},
                "ratio": {str(n): ms[n] / ms[contexts[0]] for n in contexts},
                "step_ms": {str(n): times[n] for n in contexts},
                "state_bytes": int(model.state_bytes(max(contexts), 1, torch.finfo(dt).bits // 8)),
            }
            del model
            bar.update()
    finally:
        bar.close()
    result = {"meta": meta, "presets": out}
    files = {"json": os.path.join(out_dir, "bench_decode.json"), "md": os.path.join(out_dir, "bench_decode.md")}
    return write_results(result, decode_markdown(result), files)
