"""Log-log plots of the speed benchmark (matplotlib Agg canvas; the global backend is untouched)."""

from __future__ import annotations

import os

from speedlm.bench.report import MEM_METRICS, MIB, TIME_METRICS, series


def _figure(ncols: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.6 * ncols, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _panel(ax, rows, presets, metric, kind, title, ylabel, scale=1.0):
    plotted = False
    for p in presets:
        xs, ys = series(rows, p, metric, kind)
        pts = [(x, y * scale) for x, y in zip(xs, ys) if y is not None and y > 0]
        if pts:
            ax.plot([q[0] for q in pts], [q[1] for q in pts], marker="o", label=p)
            plotted = True
    if plotted:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title)
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)


def plot_time(rows: list[dict], presets: list[str], path: str, subtitle: str = "") -> str:
    fig, axes = _figure(len(TIME_METRICS))
    for ax, (m, title) in zip(axes, TIME_METRICS.items()):
        _panel(ax, rows, presets, m, "time", title.replace(" ms", ""), "ms per token" if m == "decode" else "ms")
    if subtitle:
        fig.suptitle(subtitle)
    fig.savefig(path, dpi=110)
    return path


def plot_memory(rows: list[dict], presets: list[str], path: str, subtitle: str = "") -> str:
    fig, axes = _figure(len(MEM_METRICS) + 1)
    for ax, (m, title) in zip(axes, MEM_METRICS.items()):
        _panel(ax, rows, presets, m, "mem", title.replace(" MiB", ""), "MiB", 1.0 / MIB)
    _panel(axes[-1], rows, presets, None, "state", "inference state (analytic)", "MiB", 1.0 / MIB)
    if subtitle:
        fig.suptitle(subtitle)
    fig.savefig(path, dpi=110)
    return path


def write_plots(rows: list[dict], presets: list[str], out_dir: str, subtitle: str = "") -> dict[str, str]:
    return {
        "time": plot_time(rows, presets, os.path.join(out_dir, "bench_speed_time.png"), subtitle),
        "memory": plot_memory(rows, presets, os.path.join(out_dir, "bench_speed_memory.png"), subtitle),
    }
