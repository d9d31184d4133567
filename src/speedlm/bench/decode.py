"""Decode latency vs context, interleaved: does a token cost the same after 16k tokens as after 1k?

For each preset, one cache per context length is prefilled (untimed) with the same random
tokens; then the single-token steps alternate between the caches (step i on every cache,
in a rotating order) and each step is timed on its own. The per-context latency is the median
of its steps, and the ratio to the shortest context is taken step against step in one process,
so a machine that slows down for a minute slows every context alike. (`bench speed` measures
each length minutes apart: its decode ratios carry the drift of a shared machine.)

With `policies` (e.g. window, sink) each preset also decodes under those KV policies, every
lossy one sized to hold the same `slots` KV entries once full (window: `slots` + 1; sinks:
`sinks` + a window of `slots` - `sinks` + 1), and their steps join the same rotation, so the
rows of one preset compare policies step against step. Rows are then named `preset [policy]`.

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
from speedlm.cache.policies import make_policy
from speedlm.device import resolve_device
from speedlm.errors import SpeedlmError
from speedlm.checkpoint.pretrained import spec_config
from speedlm.progress import progress_bar


LOSSY_POLICIES = ("window", "sink", "h2o", "snapkv", "kivi")
PREFILL_CHUNK = 1024  # untimed prefill in calls of this many tokens (a scored policy's weights are (T, chunk))


def policy_at_slots(name: str, slots: int, sinks: int = 4):
    """The KV policy `name` sized to hold `slots` entries once full (None for "full": each
    mixer's own cache)."""
    if name == "full":
        return None
    if name == "window":
        return make_policy("window", window=slots + 1)
    if name == "sink":
        return make_policy("sink", window=slots - sinks + 1, sinks=sinks)
    if name == "h2o":  # half heavy hitters, half the newest keys
        return make_policy("h2o", window=slots - slots // 2 + 1, heavy=slots // 2)
    if name == "snapkv":  # holds budget .. budget + 31 slots: `slots` on average
        return make_policy("snapkv", budget=slots - 16, observe=32)
    if name == "kivi":  # every key, 2-bit codes; `slots` does not apply
        return make_policy("kivi", bits=2, group=32, residual=32)
    raise SpeedlmError(f"bench decode measures the policies full, {', '.join(LOSSY_POLICIES)}; got {name!r}")


def weight_read_probe(model, dev):
    """One read of the model's weights at the bandwidth bound: a torch copy of a tensor as large as
    its parameters (a step reads every weight once). A copy also writes what it reads, so the
    bound is generous to the model by up to 2x."""
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    src = torch.empty(n // 4 + 1, dtype=torch.float32, device=dev).fill_(1.0)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def linear_floor_probe(model, dev):
    """Every nn.Linear of the model applied to one row, back to back, as aten GEMV calls (what the
    eager step calls; the compiled step generates its own 1-row products, generate/compiled.py):
    against the weight-read bound it shows what the per-call cost of a GEMV adds on this machine."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = [torch.randn(1, m.in_features, device=dev, dtype=m.weight.dtype) for m in layers]

    def run():
        with torch.no_grad():
            for m, x in zip(layers, xs):
                torch.nn.functional.linear(x, m.weight, m.bias)

    return run


def _decode_rows(model, runs: list[tuple[str, int]], policies: dict, steps: int, gen: torch.Generator,
                 dev, step_fns: dict | None = None, probes: dict | None = None):
    """Step times of every (policy, context) run, the steps rotating over all the runs, and the
    bytes each run's cache holds at the end. step_fns: {policy name: what runs a step} (default
    the model itself; compiled decoding's rows pass generate/compiled.py's step). probes: {name:
    a call} timed once per rotation beside the steps (the bounds), so that a slow spell of the
    machine hits them as it hits the steps; their times come back under (name, None)."""
    step_fns = step_fns or {}
    probes = probes or {}
    vocab = model.config.vocab_size
    longest = max(n for _, n in runs)
    ids = torch.randint(0, vocab, (1, longest + steps + 1), generator=gen).to(dev)
    caches = {}
    with torch.no_grad():
        for run in runs:  # the same prefix for every run: the caches differ in length and policy
            caches[run] = model.init_cache(policies[run[0]])
            for s in range(0, run[1], PREFILL_CHUNK):
                model(ids[:, s : min(run[1], s + PREFILL_CHUNK)], caches[run])
        times: dict[tuple[str, int | None], list[float]] = {run: [] for run in runs}
        times.update({(name, None): [] for name in probes})
        for i in range(steps + 1):
            order = runs[i % len(runs):] + runs[: i % len(runs)]  # rotate who goes first
            for run in order:
                n = run[1]
                tok = ids[:, n + i : n + i + 1]
                synchronize(dev)
                t0 = time.perf_counter()
                step_fns.get(run[0], model)(tok, caches[run])
                synchronize(dev)
                if i:  # step 0 is a warm-up on every cache (and compiles, for a compiled step)
                    times[run].append(1000.0 * (time.perf_counter() - t0))
            for name, probe in probes.items():
                synchronize(dev)
                t0 = time.perf_counter()
                probe()
                synchronize(dev)
                if i:
                    times[name, None].append(1000.0 * (time.perf_counter() - t0))
    return times, {run: caches[run].nbytes() for run in runs}


def decode_markdown(result: dict) -> str:
    meta, base = result["meta"], result["meta"]["contexts"][0]
    ctx = meta["contexts"]
    policies = meta.get("policies", ["full"])
    first = policies[0]
    compare = len(policies) > 1  # a column of each row against the same preset's first policy
    bound = bool(meta.get("compile"))
    columns = [f"ms/token @{n}" for n in ctx] + [f"@{n} / @{base}" for n in ctx[1:]]
    columns += [f"/ [{first}] @{ctx[-1]}"] if compare else []
    columns += ["weight-read bound ms", "Linear-layers floor ms", f"@{ctx[-1]} / bound"] if bound else []
    head = "| preset | " + " | ".join(columns) + f" | state bytes @{ctx[-1]} (declared) | cache bytes @{ctx[-1]} (held) |"
    lines = [
        "# speedlm decode benchmark",
        "",
        f"- device: {meta['device']}, torch {meta['torch_version']}, dtype {meta['dtype']}, batch 1, "
        f"{meta['threads']} CPU threads; {meta['timing_method']}",
        f"- {meta['steps']} single-token steps per context after one warm-up step, interleaved across the "
        "contexts (and policies) in a rotating order; ms/token = median step; ratios of those medians, measured in "
        "one process",
    ]
    if compare and meta.get("slots") is not None:
        lines.append(f"- KV policies {', '.join(policies)}; every lossy one holds {meta['slots']} KV slots once full"
                     + (f" (sinks: {meta['sinks']} of them)" if meta.get("sinks") is not None else ""))
    if bound:
        lines.append("- compiled rows: the single-token step through torch.compile (generate/compiled.py); its "
                     "compile falls in the warm-up step. Weight-read bound: the median time of a torch copy of a "
                     "tensor the size of the model's parameters; Linear-layers floor: every nn.Linear of the model "
                     "applied to one row as aten GEMV calls, back to back (what the eager step calls); both timed "
                     "once per rotation beside the steps")
    lines += [f"- date: {meta['date']}", "", head, "|" + "---|" * (3 + len(columns))]
    for p, r in result["presets"].items():
        if "skipped" in r:
            lines.append(f"| {p} | skipped: {r['skipped']} |")
            continue
        ms = [r["ms"][str(n)] for n in ctx]
        ratios = [r["ratio"][str(n)] for n in ctx[1:]]
        vs = f" | {r['vs_first_policy']:.2f}" if compare else ""
        if bound:
            vs += f" | {r['weight_read_ms']:.3g} | {r['linear_floor_ms']:.3g} | {ms[-1] / r['weight_read_ms']:.2f}"
        cells = [f"{m:.3g}" for m in ms] + [f"{x:.2f}" for x in ratios]
        lines.append(f"| {p} | " + " | ".join(cells) + vs + f" | {r['state_bytes']:,} | {r['cache_bytes']:,} |")
    return "\n".join(lines) + "\n"


def run_decode_bench(presets, contexts=(1024, 16384), steps: int = 64, device="auto", dtype="auto", seed: int = 0,
                     out_dir: str = "runs/bench", progress: bool = True, policies=("full",), slots: int = 1023,
                     sinks: int = 4, compile: bool = False) -> dict:
    """Per-token decode latency of each preset at each context (see module doc), under each of
    `policies` (full: the mixers' own caches; window and sink at `slots` KV entries); prints the
    table, writes bench_decode.{json,md} to `out_dir` and returns the JSON dict. compile: every
    policy also decodes through the compiled step (generate/compiled.py), as a row `[policy
    compiled]` in the same rotation, and each preset gets its weight-read bound and Linear-layers floor,
    timed in that rotation."""
    presets = check_presets(presets)
    contexts = sorted(set(check_ints("contexts", contexts)))
    steps = check_int("steps", steps, 1)
    policies = list(dict.fromkeys(policies))
    sinks = check_int("sinks", sinks, 0)
    slots = check_int("slots", slots, sinks + 1)
    made = {name: policy_at_slots(name, slots, sinks) for name in policies}
    if compile:  # each policy again through the compiled step
        made.update({f"{name} compiled": made[name] for name in policies})
        policies = policies + [f"{name} compiled" for name in policies]
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    from speedlm.models.build import require_language_model

    for p in presets:
        require_language_model(spec_config(p), p)  # unknown presets and encoders fail before any work
    need = max(contexts) + steps + 1
    meta = {
        "device": str(dev), "torch_version": torch.__version__, "speedlm_version": speedlm.__version__,
        "python": platform.python_version(), "dtype": str(dt).removeprefix("torch."), "contexts": contexts,
        "steps": steps, "presets": presets, "seed": seed, "threads": torch.get_num_threads(),
        "policies": policies, "slots": slots if not set(policies) <= {"full", "full compiled"} else None,
        "sinks": sinks if "sink" in policies else None, "compile": compile,
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
            runs = [(name, n) for name in policies for n in contexts]
            step_fns = {}
            if compile:
                from speedlm.generate.compiled import CompiledStep

                compiled = CompiledStep(model)
                step_fns = {name: compiled for name in policies if name.endswith(" compiled")}
            probes = {"weight read": weight_read_probe(model, dev), "linear floor": linear_floor_probe(model, dev)} \
                if compile else {}
            times, held = _decode_rows(model, runs, made, steps, torch.Generator().manual_seed(seed), dev, step_fns,
                                       probes)
            bound = median(times["weight read", None]) if compile else None
            floor = median(times["linear floor", None]) if compile else None
            for name in policies:
                ms = {n: median(times[name, n]) for n in contexts}
                row = p if policies == ["full"] else f"{p} [{name}]"
                out[row] = {
                    "ms": {str(n): ms[n] for n in contexts},
                    "ratio": {str(n): ms[n] / ms[contexts[0]] for n in contexts},
                    "step_ms": {str(n): times[name, n] for n in contexts},
                    # declared by the model for its own caches (analytic), and held by this run's cache
                    "state_bytes": int(model.state_bytes(max(contexts), 1, torch.finfo(dt).bits // 8)),
                    "cache_bytes": held[name, max(contexts)],
                    # at the longest context, against the same preset's first policy
                    "vs_first_policy": ms[max(contexts)] / median(times[policies[0], max(contexts)]),
                    "weight_read_ms": bound,
                    "linear_floor_ms": floor,
                }
            del model
            bar.update()
    finally:
        bar.close()
    result = {"meta": meta, "presets": out}
    files = {"json": os.path.join(out_dir, "bench_decode.json"), "md": os.path.join(out_dir, "bench_decode.md")}
    return write_results(result, decode_markdown(result), files)
