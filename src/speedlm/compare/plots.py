"""The compare report's plots (matplotlib's Agg canvas; the global backend is untouched):
validation loss vs training FLOPs, decode latency vs context, cache bytes vs context, and MQAR
accuracy vs the state the model had when it answered."""

from __future__ import annotations

import os

PLOTS = {
    "loss_vs_flops": "compare_loss_vs_flops.png",
    "decode_latency": "compare_decode_latency.png",
    "cache_bytes": "compare_cache_bytes.png",
    "mqar_vs_state": "compare_mqar_vs_state.png",
}


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _series(d: dict | None) -> tuple[list[int], list[float]]:
    pts = sorted((int(k), v) for k, v in (d or {}).items() if v is not None and v > 0)
    return [k for k, _ in pts], [v for _, v in pts]


def _finish(fig, ax, path: str, title: str, plotted: bool) -> str:
    if plotted:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no finished model", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    fig.savefig(path, dpi=110)
    return path


def _per_context(models, key: str, colours, path: str, xlabel: str, ylabel: str, title: str) -> str:
    """Log-log lines of a {context length: value} field, one per model."""
    fig, ax = _figure()
    plotted = False
    for m in models:
        xs, ys = _series(m.get(key))
        if xs:
            ax.plot(xs, ys, "o-", color=colours[m["name"]], label=m["name"])
            plotted = True
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return _finish(fig, ax, path, title, plotted)


def write_plots(report: dict, out_dir: str) -> dict[str, str]:
    ok = [m for m in report["models"] if m["status"] == "ok"]
    colours = {m["name"]: f"C{i % 10}" for i, m in enumerate(report["models"])}
    paths = {key: os.path.join(out_dir, name) for key, name in PLOTS.items()}
    budget = report["meta"]["options"]["budget"]

    fig, ax = _figure()
    for m in ok:
        pts = [(c["train_flops"], c["val_loss"]) for c in m.get("curve", [])]
        if pts:
            ax.plot(*zip(*pts), "o-", markersize=3, color=colours[m["name"]], label=m["name"])
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("validation loss (nats/token)")
    _finish(fig, ax, paths["loss_vs_flops"], f"validation loss at equal compute ({budget:.2g} FLOPs each)", bool(ok))

    _per_context(ok, "decode_ms", colours, paths["decode_latency"], "context length (tokens in the cache)",
                 "decode latency (ms per token, batch 1)", "per-token decode latency vs context")
    _per_context(report["models"], "state_bytes", colours, paths["cache_bytes"], "context length (tokens)",
                 "inference cache / state (bytes, batch 1)", "cache size vs context (analytic)")

    fig, ax = _figure()
    plotted = False
    for m in ok:
        if m.get("mqar_accuracy") is not None:
            ax.plot([m["mqar_state_bytes"]], [m["mqar_accuracy"]], "o", markersize=8, color=colours[m["name"]], label=m["name"])
            plotted = True
    mqar = report["meta"]["options"].get("mqar") or {}
    if mqar:
        ax.axhline(1 / (mqar["vocab_size"] - mqar["vocab_size"] // 2), color="grey", linestyle=":", label="chance")
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("inference state at the MQAR length (bytes, float32)")
    ax.set_ylabel("MQAR accuracy")
    _finish(fig, ax, paths["mqar_vs_state"], "associative recall vs state size", plotted)
    return paths
