"""`speedlm bench flops`: each model's counted FLOPs per token (the analytic count a FLOP budget
spends, README "How FLOPs are counted") beside the FLOPs its forward (+ backward) executes,
measured with `torch.utils.flop_counter.FlopCounterMode`, per preset, length and layer kind.

The counter sees matrix products only (mm, bmm, addmm, baddbmm, convolutions, SDPA). Its SDPA
formulas are replaced here (`SDPA_FLOPS`) for two reasons: torch has none for the CPU flash
kernel (`_scaled_dot_product_flash_attention_for_cpu`, which would count 0), and its CUDA ones
charge a causal call the full T x T. Here a causal SDPA call counts the pairs a causal kernel
computes (each query's keys up to itself), and a call with an explicit mask every pair of its
T_q x T_k (the kernel computes them all, masked or not): on every device the same rule as the
analytic count, so the ratio executed / counted shows implementation overhead (block padding,
dense chunks) and nothing else. Elementwise work (scans, FFTs, gates) is invisible to the
counter: ratios compare the executed FLOPs with the counted *visible* part (`Flops.visible`).
"""

from __future__ import annotations

import datetime
import os
import platform
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from speedlm.bench.common import build_seeded, check_ints, check_presets, text_token_ids, write_results
from speedlm.device import resolve_device
from speedlm.layers.flops import Flops


# ----- the counter -----
def _pairs(tq: int, tk: int, causal: bool) -> int:
    """(query, key) pairs an SDPA call computes: all of them, or causally (torch's is_causal:
    query i sees keys 0..i) each query's keys up to itself."""
    if not causal:
        return tq * tk
    m = min(tq, tk)
    return m * (m + 1) // 2 + (tq - m) * tk


def _sdpa_formula(op) -> object:
    """A FlopCounterMode formula for one SDPA overload, reading its arguments by schema name."""
    names = [a.name for a in op.default._schema.arguments]
    backward = names[0].startswith("grad_out")

    def flops(*args, out_shape=None, **kwargs) -> int:
        arg = {**dict(zip(names, args)), **kwargs}
        b, h, tq, dq = arg["query"]
        tk, dv = arg["key"][-2], arg["value"][-1]
        causal = bool(arg.get("is_causal", False)) and arg.get("attn_mask") is None and arg.get("attn_bias") is None
        pairs = b * h * _pairs(tq, tk, causal)
        # forward: scores and values; backward (as torch's sdpa_backward_flop_count): scores
        # recomputed, grad of the scores and of v, grad of q and of k
        return 2 * pairs * (3 * dq + 2 * dv) if backward else 2 * pairs * (dq + dv)

    return flops


SDPA_OPS = [
    getattr(torch.ops.aten, name)
    for name in (
        "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward",
        "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward",
        "_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward",
        "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward",
    )
    if hasattr(torch.ops.aten, name)
]
SDPA_FLOPS = {op: _sdpa_formula(op) for op in SDPA_OPS}


def flop_counter() -> FlopCounterMode:
    """FlopCounterMode with the SDPA formulas above."""
    return FlopCounterMode(display=False, custom_mapping=SDPA_FLOPS)


def counted_by_module(fn, root: nn.Module) -> tuple[float, dict[str, float]]:
    """Run fn() under the counter: its total FLOPs, and each submodule's of `root` by its
    qualified name ("" for root), forward and backward (what ran inside the module)."""
    with flop_counter() as fc:
        fn()
    counts = fc.get_flop_counts()
    prefix = type(root).__name__
    per = {}
    for name, _ in root.named_modules():
        key = f"{prefix}.{name}" if name else prefix
        per[name] = float(sum(counts.get(key, {}).values()))
    return float(fc.get_total_flops()), per


def linear_flops_of(per_module: dict[str, float], root: nn.Module, under: str = "") -> float:
    """What the counter gave the nn.Linear modules of `root` (below `under`)."""
    return sum(per_module.get(name, 0.0) for name, m in root.named_modules()
               if isinstance(m, nn.Linear) and name.startswith(under))


# ----- one model -----
@contextmanager
def _mode(model: nn.Module, training: bool):
    was = model.training
    model.train(training)
    try:
        yield
    finally:
        model.train(was)


def _run(model: nn.Module, ids: torch.Tensor, training: bool):
    """One forward (training: the model's own loss, as the trainer computes it, and its
    gradients with respect to every parameter, discarded)."""
    if not training:
        with torch.no_grad():
            model(ids)
        return
    targets = torch.cat([ids[:, 1:], ids.new_full((ids.shape[0], 1), -100)], dim=1)
    targets = getattr(model, "benchmark_targets", lambda t: t)(targets)  # an encoder: one label per row
    params = [p for p in model.parameters() if p.requires_grad]
    loss = model.loss(ids, targets).total
    torch.autograd.grad(loss, params, allow_unused=True)


def measure(model: nn.Module, ids: torch.Tensor, training: bool = True) -> tuple[float, dict[str, float]]:
    """Executed FLOPs of one forward (+ backward) on ids (B, T) in the mode training runs
    (training) or inference runs (not): the total and each submodule's, by qualified name.
    Gradients are discarded; the model's mode, weights, .grad and the random state are as before."""
    with _mode(model, training), torch.random.fork_rng(devices=[]):
        return counted_by_module(lambda: _run(model, ids, training), model)


def executed_flops_per_token(model: nn.Module, ids: torch.Tensor, training: bool = True) -> float:
    """FLOPs per token that one training step (forward + backward; `training=False`: one
    inference forward) executes on ids (B, T), as FlopCounterMode sees them (matrix products
    only, SDPA by the rule of this module). Compare with `model.flops_per_token(T, training)`."""
    return measure(model, ids, training)[0] / ids.numel()


def counted_breakdown(model: nn.Module, context_len: int) -> tuple[list[Flops], Flops]:
    """Each block's analytic forward count (layers/flops.py) and the model's own (its LM head):
    what `model.flops_per_token(T, training=False)` sums."""
    causal = model.config.objective == "ar"  # diffusion LMs and encoders run their blocks bidirectionally
    blocks = [b.flops_breakdown(context_len, causal) for b in model.blocks]
    head = getattr(model, "lm_head", None)
    own = Flops(linear=2.0 * head.in_features * head.out_features) if isinstance(head, nn.Linear) else Flops()
    front = getattr(model, "front", None)
    if isinstance(front, nn.Linear):  # an encoder's feature projection
        own = own + Flops(linear=2.0 * front.in_features * front.out_features)
    return blocks, own


def layer_labels(model: nn.Module) -> list[str]:
    """A short name per layer: its mixer, '+moe' for an MoE FFN, 'block(...)' for a block kind
    other than pre-norm."""
    out = []
    for spec in model.config.layer_specs():
        label = spec["mixer"]["name"]
        if spec["ffn"]["name"] == "moe":
            label += "+moe"
        if spec["block"]["name"] != "prenorm":
            label = f"{spec['block']['name']}({label})"
        out.append(label)
    return out


def _block_flops(per: dict[str, float], block: nn.Module, name: str) -> float:
    """What ran inside a block: its own count, or where its forward was not called (a reversible
    stack calls its branches) its children's."""
    return per.get(name, 0.0) or sum(per.get(f"{name}.{child}", 0.0) for child, _ in block.named_children())


def compare_model(model: nn.Module, ids: torch.Tensor, training: bool = True) -> dict:
    """Counted against executed FLOPs per token for one model and batch, in total and per layer
    kind ("model": what is outside the blocks, e.g. the LM head)."""
    t, n = ids.shape[1], ids.numel()
    mult = 3.0 if training else 1.0  # training = forward + backward, the backward 2x the forward
    total, per = measure(model, ids, training)
    blocks, own = counted_breakdown(model, t)
    parts: dict[str, dict] = {}
    in_blocks = 0.0
    for i, (label, f) in enumerate(zip(layer_labels(model), blocks)):
        part = parts.setdefault(label, {"counted": 0.0, "visible": 0.0, "executed": 0.0})
        part["counted"] += mult * f.total
        part["visible"] += mult * f.visible
        executed = _block_flops(per, model.blocks[i], f"blocks.{i}")
        part["executed"] += executed / n
        in_blocks += executed
    parts["model"] = {"counted": mult * own.total, "visible": mult * own.visible, "executed": (total - in_blocks) / n}
    counted = model.flops_per_token(t, training=training)
    visible = sum(p["visible"] for p in parts.values())
    # a reversible stack recomputes its blocks inside the backward of one autograd Function, where
    # the counter's module tracking loses them: only its total is measured
    attributed = not (training and getattr(model.config, "reversible", False))
    for p in parts.values():
        p["ratio"] = p["executed"] / p["visible"] if p["visible"] and attributed else float("nan")
    return {"length": t, "counted": counted, "visible": visible, "executed": total / n,
            "ratio": total / n / visible, "parts": parts,
            "analytic_sum_matches": abs(sum(p["counted"] for p in parts.values()) - counted) <= 1e-6 * counted}


# ----- the benchmark -----
def run_flops_bench(presets, lengths=(256, 1024), training: bool = True, batch_size: int = 1, device="cpu",
                    out_dir: str = "runs/bench", seed: int = 0) -> dict:
    """For each preset and length: counted (analytic) FLOPs per token, the counter-visible part
    of that count, executed FLOPs per token, executed / visible, and the same ratio per layer
    kind. Models whose max_seq_len is shorter than a length are built with it raised (as `bench
    speed` does). Writes bench_flops.json and bench_flops.md."""
    presets = check_presets(presets)
    lengths = check_ints("lengths", lengths)
    dev = resolve_device(device)
    rows = []
    for p in presets:
        model = build_seeded(p, seed, dev, torch.float32, min_seq_len=max(lengths))
        for t in lengths:
            ids = text_token_ids((batch_size, t), seed).to(dev)
            rows.append({"preset": p, **compare_model(model, ids, training)})
    result = {
        "meta": {"device": str(dev), "torch": torch.__version__, "python": platform.python_version(),
                 "training": training, "batch_size": batch_size, "seed": seed,
                 "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
        "results": rows,
    }
    what = "training step (forward + backward)" if training else "inference forward"
    lines = [f"FLOPs per token of one {what}. counted: the analytic count (`flops_per_token`); visible: its "
             "part that FlopCounterMode can see (matrix products); executed: what the counter measured; ratio: "
             "executed / visible. Per layer kind: executed / visible.", "",
             "| preset | T | counted MFLOP | visible MFLOP | executed MFLOP | ratio | per layer kind |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        kinds = ", ".join(f"{k} {v['ratio']:.2f}" for k, v in r["parts"].items() if v["ratio"] == v["ratio"])
        kinds = kinds or "(reversible: recomputed in the backward, total only)"
        lines.append(f"| {r['preset']} | {r['length']} | {r['counted'] / 1e6:.3f} | {r['visible'] / 1e6:.3f} | "
                     f"{r['executed'] / 1e6:.3f} | {r['ratio']:.3f} | {kinds} |")
    files = {"json": os.path.join(out_dir, "bench_flops.json"), "md": os.path.join(out_dir, "bench_flops.md")}
    return write_results(result, "\n".join(lines) + "\n", files)
