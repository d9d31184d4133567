"""`speedlm bench ops`: each sequence op's fast form against its naive recurrent reference, in
one process on the same inputs: the speed-up the chunked / parallel forms buy.

Shapes are a `small` model's head: batch 1, 4 heads of 64 (HGRN: 256 channels; Based: a 16-dim
Taylor projection, 273 features), float32, forward only. Writes bench_ops.json and bench_ops.md.
"""

from __future__ import annotations

import datetime
import os
import platform

import torch
import torch.nn.functional as F

from speedlm.bench.common import check_int, check_ints, write_results
from speedlm.bench.timing import median, time_fn
from speedlm.device import resolve_device
from speedlm.layers.based import taylor_features
from speedlm.ops.delta_rule import delta_rule_chunked, delta_rule_recurrent
from speedlm.ops.gla import gla_chunked, gla_recurrent
from speedlm.ops.hgrn import hgrn_chunked, hgrn_recurrent
from speedlm.ops.linear_attention import linear_attention_chunked, linear_attention_recurrent
from speedlm.ops.performer import favor_chunked, favor_features, favor_recurrent, orthogonal_gaussian

H, D = 4, 64


def _cases(t: int, device, gen: torch.Generator) -> dict:
    """name -> (naive callable, fast callable) on shared inputs."""

    def r(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    q, k, v = r(1, H, t, D), r(1, H, t, D), r(1, H, t, D)
    phi_q, phi_k = F.elu(q) + 1, F.elu(k) + 1
    g_head = -torch.rand(1, H, t, 1, generator=gen).to(device) * 0.1
    g_chan = -torch.rand(1, H, t, D, generator=gen).to(device) * 0.1
    qn, kn = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    beta, g_delta = torch.rand(1, H, t, generator=gen).to(device), -torch.rand(1, H, t, generator=gen).to(device) * 0.1
    x, gx = r(1, t, H * D), -torch.rand(1, t, H * D, generator=gen).to(device) * 0.1
    w = orthogonal_gaussian(266, D, gen).to(device)
    qf, _ = favor_features(q, w)
    kf, ka = favor_features(k, w)
    tq, tk = taylor_features(r(1, H, t, 16) * 0.5), taylor_features(r(1, H, t, 16) * 0.5)
    return {
        "linear_attention": (lambda: linear_attention_recurrent(phi_q, phi_k, v), lambda: linear_attention_chunked(phi_q, phi_k, v)),
        "retention (per-head decay)": (lambda: gla_recurrent(q, k, v, g_head), lambda: gla_chunked(q, k, v, g_head)),
        "gla (per-channel decay)": (lambda: gla_recurrent(q, k, v, g_chan), lambda: gla_chunked(q, k, v, g_chan)),
        "delta rule": (lambda: delta_rule_recurrent(qn, kn, v, beta), lambda: delta_rule_chunked(qn, kn, v, beta)),
        "gated delta rule": (lambda: delta_rule_recurrent(qn, kn, v, beta, g_delta), lambda: delta_rule_chunked(qn, kn, v, beta, g_delta)),
        "hgrn": (lambda: hgrn_recurrent(x, gx), lambda: hgrn_chunked(x, gx)),
        "performer (FAVOR+)": (lambda: favor_recurrent(qf, kf, ka, v), lambda: favor_chunked(qf, kf, ka, v)),
        "based (Taylor features)": (lambda: linear_attention_recurrent(tq, tk, v), lambda: linear_attention_chunked(tq, tk, v)),
    }


def run_ops_bench(lengths=(4096,), repeats: int = 3, device="auto", out_dir: str = "runs/bench", seed: int = 0) -> dict:
    lengths = check_ints("lengths", lengths)
    repeats = check_int("repeats", repeats, 1)
    dev = resolve_device(device)
    rows = []
    with torch.no_grad():
        for t in lengths:
            for name, (naive, fast) in _cases(t, dev, torch.Generator().manual_seed(seed)).items():
                # interleaved pairs, so that a slow spell of a shared machine hits both forms alike,
                # each form warmed right before its timed run (the other form's allocations would
                # otherwise cost it fresh pages); the speed-up is the median of the pairs' ratios
                naive_s, fast_s = [], []
                for _ in range(repeats):
                    naive_s += time_fn(lambda _: naive(), dev, repeats=1, warmup=1)
                    fast_s += time_fn(lambda _: fast(), dev, repeats=1, warmup=1)
                naive_ms, fast_ms = 1000 * median(naive_s), 1000 * median(fast_s)
                speedup = median([a / b for a, b in zip(naive_s, fast_s)])
                rows.append({"op": name, "length": t, "naive_ms": naive_ms, "fast_ms": fast_ms, "speedup": speedup,
                             "naive_samples_ms": [1000 * s for s in naive_s], "fast_samples_ms": [1000 * s for s in fast_s]})
                print(f"{name:<28} T={t:<6} naive {naive_ms:9.1f} ms  fast {fast_ms:8.2f} ms  x{speedup:,.1f}", flush=True)
    result = {
        "meta": {"device": str(dev), "torch": torch.__version__, "python": platform.python_version(),
                 "threads": torch.get_num_threads(), "repeats": repeats, "heads": H, "head_dim": D,
                 "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
        "results": rows,
    }
    lines = ["| op | T | naive recurrent ms | chunked / parallel ms | speed-up (median of paired ratios) |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['op']} | {r['length']} | {r['naive_ms']:.1f} | {r['fast_ms']:.2f} | {r['speedup']:.1f}x |" for r in rows]
    md = "\n".join(lines) + "\n"
    files = {"json": os.path.join(out_dir, "bench_ops.json"), "md": os.path.join(out_dir, "bench_ops.md")}
    return write_results(result, md, files)
