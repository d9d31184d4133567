"""`speedlm bench ops`: each sequence op's fast form against its naive recurrent reference, in
one process on the same inputs: the speed-up the chunked / parallel forms buy.

Shapes are a `small` model's head: batch 1, 4 heads of 64 (HGRN: 256 channels; Based: a 16-dim
Taylor projection, 273 features; Mamba: the 512 inner channels of mamba-small with 16 states
each, and mamba-tiny's 128; Mamba-2: mamba2-small's 8 heads of 64 with 64 states; Hyena: 256 channels, a filter as long as the
sequence), float32, forward only. The fast form is what the model runs: Mamba's scan goes through
its dispatch (the compiled CPU kernel from 1,024 tokens, ops/selective_scan_compiled.py; its
compile falls in the untimed warm-up), with the eager chunk-parallel form in a row of its own.
Where transformers and mambapy are installed, two more rows time the whole Mamba mixer against
transformers' MambaMixer on the same weights (bench/hf_mamba.py). Writes bench_ops.json and
bench_ops.md.
"""

from __future__ import annotations

import datetime
import os
import platform

import torch
import torch.nn.functional as F

from speedlm.bench import hf_mamba
from speedlm.bench.common import check_int, check_ints, write_results
from speedlm.bench.timing import median, time_fn
from speedlm.device import resolve_device
from speedlm.errors import SpeedlmError
from speedlm.layers.based import taylor_features
from speedlm.ops.delta_rule import delta_rule_chunked, delta_rule_recurrent
from speedlm.ops.gla import gla_chunked, gla_recurrent
from speedlm.ops.hgrn import hgrn_chunked, hgrn_recurrent
from speedlm.ops.long_conv import direct_causal_conv_reference, fft_causal_conv
from speedlm.ops.linear_attention import linear_attention_chunked, linear_attention_recurrent
from speedlm.ops.performer import favor_chunked, favor_features, favor_recurrent, orthogonal_gaussian
from speedlm.ops.selective_scan import SELECTIVE_SCAN, selective_scan_chunked, selective_scan_recurrent
from speedlm.ops.ssd import ssd_chunked, ssd_recurrent

H, D = 4, 64
MAMBA_CHANNELS, MAMBA_STATES, MAMBA_TINY_CHANNELS = 512, 16, 128
SSD_HEADS, SSD_HEAD_DIM, SSD_STATES = 8, 64, 64
HYENA_CHANNELS = 256


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
    # Mamba: steps of softplus(N(0,1) - 3) ~ 0.05 and A = -[1..16], as at initialisation
    su, sdt = r(1, t, MAMBA_CHANNELS), F.softplus(r(1, t, MAMBA_CHANNELS) - 3.0)
    sa = -torch.arange(1, MAMBA_STATES + 1.0, device=device).expand(MAMBA_CHANNELS, MAMBA_STATES)
    sb, sc = r(1, t, MAMBA_STATES), r(1, t, MAMBA_STATES)
    tu, tdt = su[..., :MAMBA_TINY_CHANNELS], sdt[..., :MAMBA_TINY_CHANNELS]  # mamba-tiny's 128 channels
    xx, xdt = r(1, t, SSD_HEADS, SSD_HEAD_DIM), F.softplus(r(1, t, SSD_HEADS) - 3.0)
    xa = -torch.linspace(1.0, 16.0, SSD_HEADS, device=device)
    xb, xc = r(1, t, 1, SSD_STATES), r(1, t, 1, SSD_STATES)
    lu, lh = r(1, t, HYENA_CHANNELS), r(HYENA_CHANNELS, t) * torch.exp(-torch.arange(t, device=device) / 64.0)
    return {
        "linear_attention": (lambda: linear_attention_recurrent(phi_q, phi_k, v), lambda: linear_attention_chunked(phi_q, phi_k, v)),
        "retention (per-head decay)": (lambda: gla_recurrent(q, k, v, g_head), lambda: gla_chunked(q, k, v, g_head)),
        "gla (per-channel decay)": (lambda: gla_recurrent(q, k, v, g_chan), lambda: gla_chunked(q, k, v, g_chan)),
        "delta rule": (lambda: delta_rule_recurrent(qn, kn, v, beta), lambda: delta_rule_chunked(qn, kn, v, beta)),
        "gated delta rule": (lambda: delta_rule_recurrent(qn, kn, v, beta, g_delta), lambda: delta_rule_chunked(qn, kn, v, beta, g_delta)),
        "hgrn": (lambda: hgrn_recurrent(x, gx), lambda: hgrn_chunked(x, gx)),
        "performer (FAVOR+)": (lambda: favor_recurrent(qf, kf, ka, v), lambda: favor_chunked(qf, kf, ka, v)),
        "based (Taylor features)": (lambda: linear_attention_recurrent(tq, tk, v), lambda: linear_attention_chunked(tq, tk, v)),
        "mamba selective scan": (lambda: selective_scan_recurrent(su, sdt, sa, sb, sc),
                                 lambda: SELECTIVE_SCAN(su, sdt, sa, sb, sc)),
        "mamba selective scan (eager chunked form)": (lambda: selective_scan_recurrent(su, sdt, sa, sb, sc),
                                                      lambda: selective_scan_chunked(su, sdt, sa, sb, sc)),
        "mamba selective scan (tiny: 128 channels)": (
            lambda: selective_scan_recurrent(tu, tdt, sa[:MAMBA_TINY_CHANNELS], sb, sc),
            lambda: SELECTIVE_SCAN(tu, tdt, sa[:MAMBA_TINY_CHANNELS], sb, sc)),
        "mamba-2 SSD": (lambda: ssd_recurrent(xx, xdt, xa, xb, xc), lambda: ssd_chunked(xx, xdt, xa, xb, xc)),
        "hyena long conv (FFT vs direct)": (lambda: direct_causal_conv_reference(lu, lh), lambda: fft_causal_conv(lu, lh)),
        **_hf_mamba_cases(t, device),
    }


def _hf_mamba_cases(t: int, device) -> dict:
    """The whole Mamba mixer (mamba-small's sizes) against transformers' MambaMixer on the same
    weights, its sequential loop and its `use_mambapy` parallel scan (bench/hf_mamba.py); only
    where transformers and mambapy are installed (the `hf` extra), on CPU."""
    if not hf_mamba.available() or torch.device(device).type != "cpu":
        return {}
    return {f"mamba mixer vs transformers MambaMixer ({name})": hf_mamba.mamba_mixer_pair(mambapy, t)
            for name, mambapy in (("sequential", False), ("use_mambapy", True))}


def op_names() -> list[str]:
    return list(_cases(2, "cpu", torch.Generator().manual_seed(0)))


def select_ops(only: list[str] | None) -> list[str]:
    """The op names containing any of the substrings in `only` (all when None)."""
    names = op_names()
    if not only:
        return names
    chosen = [n for n in names if any(o.lower() in n.lower() for o in only)]
    if not chosen:
        raise SpeedlmError(f"--ops {','.join(only)} matches no op; the ops are: {', '.join(names)}")
    return chosen


def run_ops_bench(lengths=(4096,), repeats: int = 3, device="auto", out_dir: str = "runs/bench", seed: int = 0,
                  only: list[str] | None = None) -> dict:
    chosen = select_ops(only)
    lengths = check_ints("lengths", lengths)
    repeats = check_int("repeats", repeats, 1)
    dev = resolve_device(device)
    rows = []
    with torch.no_grad():
        for t in lengths:
            for name, (naive, fast) in _cases(t, dev, torch.Generator().manual_seed(seed)).items():
                if name not in chosen:
                    continue
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
    lines = ["| op | T | reference ms (naive recurrent loop, or transformers') | fast ms (the form speedlm runs) "
             "| speed-up (median of paired ratios) |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['op']} | {r['length']} | {r['naive_ms']:.1f} | {r['fast_ms']:.2f} | {r['speedup']:.1f}x |" for r in rows]
    md = "\n".join(lines) + "\n"
    files = {"json": os.path.join(out_dir, "bench_ops.json"), "md": os.path.join(out_dir, "bench_ops.md")}
    return write_results(result, md, files)
