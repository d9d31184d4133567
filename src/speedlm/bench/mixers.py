"""`speedlm bench mixers`: one token mixer's forward alone, the first layer's mixer of each preset
at that preset's width, on the same inputs in one process: the mixer-level cost that model-level
numbers (`bench speed`: FFNs and projections included) dilute. Forward time (median of
interleaved runs) and peak memory per length, the ratio to the first preset, and the scaling
exponent. Writes bench_mixers.json and bench_mixers.md.

Every mixer starts from empty process caches (ops/caches.py), so none profits from a plan or a
table another built: the caches are cleared before each mixer's first call, whose time spent
building attention plans is reported apart (plan build s), and before each timed call, whose
one untimed warm-up call pays that cost again: first calls are excluded from forward ms for every
mixer alike.
"""

from __future__ import annotations

import datetime
import math
import os
import platform

import torch

from speedlm.bench.common import build_seeded, check_int, check_ints, check_presets, text_token_ids, write_results
from speedlm.bench.memory import PeakMemory
from speedlm.bench.timing import median, time_fn
from speedlm.device import resolve_device
from speedlm.layers.mixer import SeqMeta
from speedlm.ops.caches import clear_process_caches
from speedlm.ops.sparse_attention import plan_stats


def _slope(xs, ys) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    den = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / den if den else float("nan")


def run_mixers_bench(presets, lengths=(4096, 16384), repeats: int = 3, device="auto", out_dir: str = "runs/bench",
                     seed: int = 0) -> dict:
    presets = check_presets(presets)
    lengths = check_ints("lengths", lengths)
    repeats = check_int("repeats", repeats, 1)
    dev = resolve_device(device)
    mixers = {p: build_seeded(p, seed, dev, torch.float32, min_seq_len=max(lengths)).blocks[0].mixer.eval() for p in presets}
    rows = []
    with torch.no_grad():
        for t in lengths:
            ids = text_token_ids((1, t), seed).to(dev)
            metas = {p: SeqMeta(token_ids=ids, causal=m.supports_causal) for p, m in mixers.items()}  # encoders' mixers bidirectional
            inputs = {p: torch.randn(1, t, m.dims.d_model, generator=torch.Generator().manual_seed(seed)).to(dev)
                      for p, m in mixers.items()}
            first = {}
            for p, m in mixers.items():  # the first call from empty caches, then its memory once warm
                clear_process_caches()
                m(inputs[p], metas[p])
                first[p] = plan_stats()
                with PeakMemory(dev) as pm:
                    out = m(inputs[p], metas[p])
                    del out
                first[p]["peak"] = pm.peak_bytes
            samples = {p: [] for p in presets}
            for _ in range(repeats):  # interleaved: a slow spell of the machine hits every mixer alike
                for p, m in mixers.items():
                    clear_process_caches()
                    samples[p] += time_fn(lambda _, m=m, x=inputs[p], meta=metas[p]: m(x, meta), dev, repeats=1, warmup=1)
            for p, m in mixers.items():
                rows.append({"preset": p, "mixer": type(m).__name__, "length": t, "fwd_ms": 1000 * median(samples[p]),
                             "peak_mem_mib": first[p]["peak"] / 2**20, "samples_ms": [1000 * s for s in samples[p]],
                             "plan_build_s": first[p]["seconds"], "plans_built": first[p]["built"]})
    base = presets[0]
    for r in rows:
        b = next(x for x in rows if x["preset"] == base and x["length"] == r["length"])
        r["fwd_ratio"] = r["fwd_ms"] / b["fwd_ms"]
    exponents = {}
    for p in presets:
        mine = [r for r in rows if r["preset"] == p]
        exponents[p] = {"fwd": _slope([r["length"] for r in mine], [r["fwd_ms"] for r in mine]),
                        "mem": _slope([r["length"] for r in mine], [max(r["peak_mem_mib"], 1e-9) for r in mine])}
    result = {
        "meta": {"device": str(dev), "torch": torch.__version__, "python": platform.python_version(),
                 "threads": torch.get_num_threads(), "repeats": repeats, "baseline": base,
                 "first_call": "excluded from fwd_ms for every mixer (caches cleared, one untimed warm-up call); "
                               "plan_build_s: seconds building attention plans in the first call from empty caches",
                 "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
        "results": rows, "exponents": exponents,
    }
    lines = [f"| preset (first layer's mixer) | T | forward ms | vs {base} | peak memory MiB | plan build s |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['preset']} ({r['mixer']}) | {r['length']} | {r['fwd_ms']:.1f} | {r['fwd_ratio']:.3f}x | "
              f"{r['peak_mem_mib']:.1f} | {r['plan_build_s']:.3f} |" for r in rows]
    if len(lengths) > 1:  # a slope needs two lengths
        lines += ["", "| preset | forward time exponent | peak memory exponent |", "|---|---|---|"]
        lines += [f"| {p} | {e['fwd']:.2f} | {e['mem']:.2f} |" for p, e in exponents.items()]
    files = {"json": os.path.join(out_dir, "bench_mixers.json"), "md": os.path.join(out_dir, "bench_mixers.md")}
    return write_results(result, "\n".join(lines) + "\n", files)
