"""`speedlm bench moe`: the MoE FFN's sorted grouped dispatch against the per-expert loop with
index gathers that Hugging Face's Mixtral block uses, in one process on the same tokens,
forward and forward + backward.

Shapes are mixtral-small's FFN by default: width 256, expert hidden 704, 8 experts, top-2, a
random float32 router, tokens flattened over the batch. The dispatch runs as the model runs it
("auto": `torch._grouped_mm` where it passes its probe, else the padded batched matmul); the
padded and sliced forms are also timed on their own, and so are the experts' matrix products
alone on tokens already in expert order: the bound that no dispatch can beat, which shows how
much of the loop's time is dispatch at all. Writes bench_moe.json and bench_moe.md.
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
from speedlm.ops import moe


def _forms(presorted):
    """name -> dispatch(x, weights, experts, w_gate, w_up, w_down). `presorted`: the tokens
    already gathered in expert order and the group sizes, for the matmul-only bound."""

    def matmuls_alone(x, rw, ex, w_gate, w_up, w_down):
        # only the experts' matrix products, on tokens already in expert order (the gather is
        # left out of the timing): what no dispatch can beat
        xs, sizes = presorted
        xs = xs.detach().requires_grad_(x.requires_grad)
        return torch.cat([(F.silu(xe @ w_gate[e]) * (xe @ w_up[e])) @ w_down[e] for e, xe in enumerate(torch.split(xs, sizes))])

    return {
        "per-expert loop (HF Mixtral)": lambda *a: moe.moe_swiglu_loop(*a),
        "sorted grouped (auto)": lambda *a: moe.moe_swiglu(*a)[0],
        "sorted grouped (padded bmm)": lambda *a: moe.moe_swiglu(*a, backend="padded")[0],
        "sorted grouped (sliced)": lambda *a: moe.moe_swiglu(*a, backend="sliced")[0],
        "matmuls alone (the bound)": matmuls_alone,
    }


def run_moe_bench(tokens=(8192,), d_model: int = 256, hidden: int = 704, experts: int = 8, top_k: int = 2,
                  repeats: int = 5, device="auto", out_dir: str = "runs/bench", seed: int = 0) -> dict:
    tokens = check_ints("tokens", tokens)
    for name, value, least in (("d_model", d_model, 1), ("hidden", hidden, 1), ("experts", experts, 1),
                               ("repeats", repeats, 1)):
        check_int(name, value, least)
    check_int("top_k", top_k, 1)
    if top_k > experts:
        from speedlm.errors import SpeedlmError

        raise SpeedlmError(f"top_k={top_k} must not exceed the number of experts ({experts})")
    dev = resolve_device(device)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for n in tokens:
        x = torch.randn(n, d_model, generator=gen).to(dev)
        ws = [(torch.randn(*s, generator=gen) * d_model ** -0.5).to(dev) for s in
              ((experts, d_model, hidden), (experts, d_model, hidden), (experts, hidden, d_model))]
        logits = torch.randn(n, experts, generator=gen).to(dev)
        rw, ex, _ = moe.route_topk(logits, top_k)
        order = torch.argsort(ex.flatten(), stable=True)
        forms = _forms((x.index_select(0, order // top_k), torch.bincount(ex.flatten(), minlength=experts).tolist()))
        for mode in ("forward", "forward+backward"):
            def call(form, mode=mode):
                if mode == "forward":
                    with torch.no_grad():
                        return form(x, rw, ex, *ws)
                leaves = [t.detach().requires_grad_() for t in (x, *ws)]
                out = form(leaves[0], rw, ex, *leaves[1:])
                torch.autograd.grad(out.square().sum(), leaves, allow_unused=True)  # the bound reads presorted x
                return out

            samples = {name: [] for name in forms}
            for _ in range(repeats):  # interleaved: a slow spell of the machine hits every form alike
                for name, form in forms.items():
                    samples[name] += time_fn(lambda _, f=form: call(f), dev, repeats=1, warmup=1)
            base = samples["per-expert loop (HF Mixtral)"]
            for name, s in samples.items():
                rows.append({"tokens": n, "mode": mode, "form": name, "ms": 1000 * median(s),
                             "speedup_vs_loop": median([b / a for a, b in zip(s, base)]),
                             "samples_ms": [1000 * v for v in s]})
                print(f"T={n:<6} {mode:<17} {name:<28} {1000 * median(s):8.2f} ms  x{rows[-1]['speedup_vs_loop']:.2f} vs loop",
                      flush=True)
    result = {
        "meta": {"device": str(dev), "torch": torch.__version__, "python": platform.python_version(),
                 "threads": torch.get_num_threads(), "repeats": repeats, "d_model": d_model, "hidden": hidden,
                 "experts": experts, "top_k": top_k, "auto": moe.resolve_backend("auto", dev, torch.float32),
                 "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
        "results": rows,
    }
    lines = ["| tokens | pass | dispatch | ms (median) | speed-up vs the loop (median of paired ratios) |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['tokens']} | {r['mode']} | {r['form']} | {r['ms']:.2f} | {r['speedup_vs_loop']:.2f}x |" for r in rows]
    files = {"json": os.path.join(out_dir, "bench_moe.json"), "md": os.path.join(out_dir, "bench_moe.md")}
    return write_results(result, "\n".join(lines) + "\n", files)
