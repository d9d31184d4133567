"""Log-log plots of the speed benchmark (matplotlib Agg canvas; the global backend is untouched).
Each preset keeps one style in every panel (bench/styles.py: a hue per mixer family, a distinct
colour and marker per preset), named by the figure's legend and at the end of its curve."""

from __future__ import annotations

import os

from speedlm.bench.report import MEM_METRICS, MIB, TIME_METRICS, series
from speedlm.bench.styles import figure, grow_hidden, label_ends, legend, plain_numbers, settle, styles_for, wrap

PANEL = (5.2, 4.4)  # inches per panel; the legend adds its own width


def _panel(ax, rows, presets, styles, metric, kind, title, ylabel, scale=1.0) -> list:
    lines = []
    for p in presets:
        xs, ys = series(rows, p, metric, kind)
        pts = [(x, y * scale) for x, y in zip(xs, ys) if y is not None and y > 0]
        if pts:
            lines += ax.plot([q[0] for q in pts], [q[1] for q in pts], label=p, markersize=5, **styles[p].kw())
    if lines:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        lo, hi = ax.get_xlim()
        ax.set_xlim(lo, hi * max(4, hi / lo) ** 0.4)  # room on the right for the names
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title)
    ax.set_xlabel("sequence length (tokens; log scale)")
    ax.set_ylabel(f"{ylabel} (log scale)" if lines else ylabel)
    ax.grid(True, which="both", alpha=0.3)
    plain_numbers(ax)
    return lines


def _save(fig, axes, panels, styles, presets, path, subtitle) -> str:
    if any(panels):
        legend(fig, styles, presets)
    if subtitle:
        fig.suptitle(wrap(subtitle, 100))
    settle(fig)
    for ax, lines in zip(axes, panels):
        if lines:
            grow_hidden(ax, lines)
            label_ends(ax, lines)
    fig.savefig(path, dpi=110)
    return path


def plot_time(rows: list[dict], presets: list[str], path: str, subtitle: str = "") -> str:
    styles = styles_for({p: p for p in presets})
    fig, axes = figure(PANEL[0] * len(TIME_METRICS) + 2, PANEL[1], len(TIME_METRICS))
    panels = [
        _panel(ax, rows, presets, styles, m, "time", title.replace(" ms", ""), "ms per token" if m == "decode" else "ms")
        for ax, (m, title) in zip(axes, TIME_METRICS.items())
    ]
    return _save(fig, axes, panels, styles, presets, path, subtitle)


def plot_memory(rows: list[dict], presets: list[str], path: str, subtitle: str = "") -> str:
    styles = styles_for({p: p for p in presets})
    fig, axes = figure(PANEL[0] * (len(MEM_METRICS) + 1) + 2, PANEL[1], len(MEM_METRICS) + 1)
    panels = [
        _panel(ax, rows, presets, styles, m, "mem", title.replace(" MiB", ""), "MiB", 1.0 / MIB)
        for ax, (m, title) in zip(axes, MEM_METRICS.items())
    ]
    panels.append(_panel(axes[-1], rows, presets, styles, None, "state", "inference state (analytic)", "MiB", 1.0 / MIB))
    return _save(fig, axes, panels, styles, presets, path, subtitle)


def write_plots(rows: list[dict], presets: list[str], out_dir: str, subtitle: str = "") -> dict[str, str]:
    return {
        "time": plot_time(rows, presets, os.path.join(out_dir, "bench_speed_time.png"), subtitle),
        "memory": plot_memory(rows, presets, os.path.join(out_dir, "bench_speed_memory.png"), subtitle),
    }
