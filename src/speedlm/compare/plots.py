"""The compare report's plots (matplotlib's Agg canvas; the global backend is untouched):
validation loss vs training FLOPs, decode latency vs context, cache bytes vs context, and MQAR
accuracy vs the state the model had when it answered. Every model keeps one style in all four
(bench/styles.py: a hue per mixer family, a distinct colour and marker per model)."""

from __future__ import annotations

import os

from speedlm.bench.styles import (
    figure, grow_hidden, label_ends, label_points, legend, plain_numbers, settle, styles_for, wrap,
)

PLOTS = {
    "loss_vs_flops": "compare_loss_vs_flops.png",
    "decode_latency": "compare_decode_latency.png",
    "cache_bytes": "compare_cache_bytes.png",
    "mqar_vs_state": "compare_mqar_vs_state.png",
}
SIZE = (8.6, 4.8)  # room for a legend of a dozen models to the right of the axes


def _series(d: dict | None) -> tuple[list[int], list[float]]:
    pts = sorted((int(k), v) for k, v in (d or {}).items() if v is not None and v > 0)
    return [k for k, _ in pts], [v for _, v in pts]


def _finish(fig, ax, styles, lines: list, path: str, title: str, scatter: bool = False) -> str:
    """Legend, title, grid, then each model's name on the plot (at the end of its curve, or
    beside its point for a `scatter`), placed once the layout is final."""
    if lines:
        legend(fig, styles, [line.get_label() for line in lines])
    else:
        ax.text(0.5, 0.5, "no finished model", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(wrap(title))
    ax.grid(True, which="both", alpha=0.3)
    plain_numbers(ax)
    if lines:
        settle(fig)
        grow_hidden(ax, lines)
        (label_points if scatter else label_ends)(ax, lines)
    fig.savefig(path, dpi=110)
    return path


def _per_context(models, key: str, styles, path: str, xlabel: str, ylabel: str, title: str) -> str:
    """Log-log lines of a {context length: value} field, one per model."""
    from matplotlib.ticker import NullLocator

    fig, (ax,) = figure(*SIZE)
    lines = []
    for m in models:
        xs, ys = _series(m.get(key))
        if xs:
            lines += ax.plot(xs, ys, label=m["name"], markersize=5, **styles[m["name"]].kw())
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    contexts = sorted({x for line in lines for x in line.get_xdata()})
    if contexts:  # the measured lengths as plain numbers; room on the right for the names
        ax.set_xticks(contexts, [f"{c:,}" for c in contexts])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlim(contexts[0] / 1.3, contexts[-1] * max(4, contexts[-1] / contexts[0]) ** 0.35)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return _finish(fig, ax, styles, lines, path, title)


def write_plots(report: dict, out_dir: str) -> dict[str, str]:
    ok = [m for m in report["models"] if m["status"] == "ok"]
    # a model whose config failed to load has no config and draws nothing
    styles = styles_for({m["name"]: m["config"] for m in report["models"] if "config" in m})
    paths = {key: os.path.join(out_dir, name) for key, name in PLOTS.items()}
    opts = report["meta"]["options"]
    budget = (f"{opts['time_budget']:g} s of training each" if opts.get("time_budget") is not None
              else f"{opts['budget']:.2g} FLOPs each")

    fig, (ax,) = figure(*SIZE)
    lines = []
    for m in ok:
        pts = [(c["train_flops"], c["val_loss"]) for c in m.get("curve", [])]
        if pts:
            lines += ax.plot(*zip(*pts), label=m["name"], markersize=4, **styles[m["name"]].kw())
    ax.set_xscale("log")
    if lines:  # room on the right for the names
        lo, hi = ax.get_xlim()
        ax.set_xlim(lo, hi * (hi / lo) ** 0.35)
    ax.set_xlabel("training FLOPs (log scale)")
    ax.set_ylabel("validation loss (nats/token)")
    _finish(fig, ax, styles, lines, paths["loss_vs_flops"],
            f"validation loss at equal {'time' if opts.get('time_budget') is not None else 'compute'} ({budget})")

    _per_context(ok, "decode_ms", styles, paths["decode_latency"], "context length (tokens in the cache; log scale)",
                 "decode latency (ms per token, batch 1; log scale)", "per-token decode latency vs context")
    _per_context(report["models"], "state_bytes", styles, paths["cache_bytes"], "context length (tokens; log scale)",
                 "inference cache / state (bytes, batch 1; log scale)", "cache size vs context (analytic)")

    fig, (ax,) = figure(*SIZE)
    points = []
    for m in ok:
        if m.get("mqar_accuracy") is not None:
            points += ax.plot([m["mqar_state_bytes"]], [m["mqar_accuracy"]], label=m["name"], markersize=7,
                              **{**styles[m["name"]].kw(), "linestyle": "none"})
    mqar = report["meta"]["options"].get("mqar") or {}
    if mqar:
        chance = 1 / (mqar["vocab_size"] - mqar["vocab_size"] // 2)
        ax.axhline(chance, color="grey", linestyle=":")
        ax.text(0.01, chance, "chance", color="grey", fontsize=7, va="bottom", transform=ax.get_yaxis_transform())
    ax.set_xscale("log")
    if points:  # room on both sides for the names beside the points
        lo, hi = min(p.get_xdata()[0] for p in points), max(p.get_xdata()[0] for p in points)
        ax.set_xlim(lo / 4, hi * 4)
    ax.set_ylim(-0.02, 1.05)
    ax.set_xlabel("inference state at the MQAR length (bytes, float32; log scale)")
    ax.set_ylabel("MQAR accuracy")
    _finish(fig, ax, styles, points, paths["mqar_vs_state"], "associative recall vs state size",
            scatter=True)
    return paths
