"""`speedlm bench depth`: one training step (forward + backward) of a preset at several depths,
with reversible residual layers on and off, in one process on the same tokens: peak memory
above the model's weights, and time. Reversible layers should hold activation memory flat in
depth (the memory exponent against depth near 0); ordinary residual layers grow linearly.
Writes bench_depth.json and bench_depth.md.
"""

from __future__ import annotations

import datetime
import os
import platform

import torch

from speedlm.bench.common import check_int, check_ints, text_token_ids, write_results
from speedlm.bench.memory import PeakMemory
from speedlm.bench.mixers import _slope
from speedlm.bench.timing import median, time_fn
from speedlm.device import resolve_device
from speedlm.errors import SpeedlmError


def run_depth_bench(preset: str = "reformer-small", depths=(2, 4, 8), seq_len: int = 2048, batch_size: int = 1,
                    repeats: int = 2, device="auto", out_dir: str = "runs/bench", seed: int = 0) -> dict:
    from speedlm.models import build_model, resolve_config

    depths = check_ints("depths", depths)
    seq_len, batch_size, repeats = check_int("seq_len", seq_len, 2), check_int("batch_size", batch_size, 1), check_int("repeats", repeats, 1)
    from speedlm.models.build import require_language_model

    cfg = resolve_config(preset)
    require_language_model(cfg, preset)
    if any(d % len(cfg.pattern) for d in depths):
        raise SpeedlmError(f"every depth must be a multiple of the pattern length {len(cfg.pattern)} ({cfg.pattern!r})")
    dev = resolve_device(device)
    ids = text_token_ids((batch_size, seq_len + 1), seed).to(dev)
    x, y = ids[:, :-1], ids[:, 1:]
    rows = []
    for reversible in (True, False):
        for depth in depths:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = build_model(cfg, n_layers=depth, reversible=reversible,
                                    max_seq_len=max(cfg.max_seq_len, seq_len)).to(dev)

            def step(_=None, model=model):
                model.zero_grad(set_to_none=False)
                model.loss(x, y).total.backward()

            step()  # gradients allocated once, outside the measured region
            with PeakMemory(dev) as pm:
                step()
            times = time_fn(step, dev, repeats=repeats, warmup=0)
            rows.append({"reversible": reversible, "n_layers": depth, "peak_mem_mib": pm.peak_bytes / 2**20,
                         "step_ms": 1000 * median(times)})
            del model
    exponents = {
        f"reversible={rev}": _slope([r["n_layers"] for r in rows if r["reversible"] == rev],
                                    [max(r["peak_mem_mib"], 1e-9) for r in rows if r["reversible"] == rev])
        for rev in (True, False)
    }
    result = {
        "meta": {"preset": preset, "seq_len": seq_len, "batch_size": batch_size, "device": str(dev),
                 "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
                 "memory": pm.method, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
        "results": rows, "memory_exponent_in_depth": exponents,
    }
    lines = [f"{preset}, one training step of {batch_size} x {seq_len} tokens", "",
             "| reversible | layers | peak memory MiB (above weights and gradients) | step ms |", "|---|---|---|---|"]
    lines += [f"| {r['reversible']} | {r['n_layers']} | {r['peak_mem_mib']:.1f} | {r['step_ms']:.0f} |" for r in rows]
    lines += ["", "| | peak memory exponent in depth |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in exponents.items()]
    files = {"json": os.path.join(out_dir, "bench_depth.json"), "md": os.path.join(out_dir, "bench_depth.md")}
    return write_results(result, "\n".join(lines) + "\n", files)
