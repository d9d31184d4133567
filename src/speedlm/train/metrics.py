"""Training metrics: a JSONL log (one JSON object per line) and a loss-curve plot.

JSONL because it is append-only (a crash loses at most the line being written), greppable,
and loads with one line of pandas. Each record is flushed as it is written so `tail -f`
and a crashed run both see everything logged so far.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


class MetricsWriter:
    """Appends one JSON object per line to `path`, flushed after every record.

    Non-finite floats (a diverged loss) are written as `null` so every line stays valid
    JSON for strict parsers.
    """

    def __init__(self, path: str | os.PathLike, append: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a" if append else "w", encoding="utf-8")

    def write(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._f.write(json.dumps(clean) + "\n")
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All records of a JSONL metrics file; a torn last line (crash mid-write) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def truncate_metrics(path: str | os.PathLike, max_step: int) -> None:
    """Keep only records with step <= max_step.

    On resume the steps after the checkpoint are trained again; without this their old
    records (logged before the crash) would appear twice.
    """
    path = Path(path)
    if not path.exists():
        return
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= max_step]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in kept:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def plot_losses(jsonl_path: str | os.PathLike, png_path: str | os.PathLike) -> Path:
    """Train and validation loss vs step (log-scale y), tokens on a top axis, saved as PNG.

    Uses matplotlib's object API with the Agg canvas rather than pyplot, so it never
    needs a display and never changes the global backend of the calling program.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogFormatter

    records = read_metrics(jsonl_path)
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]

    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", linewidth=1.5, markersize=4)
    positive = [v for _, v in train + val if v > 0]
    if positive:
        ax.set_yscale("log")
        # plain numbers ("3.2") instead of the default "3.2 x 10^0" on a sub-decade range
        plain = LogFormatter(labelOnlyBase=False)
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(True, which="both", alpha=0.3)
    if train or val:
        ax.legend()

    # tokens per step is constant within a run, so tokens is a linear function of step and
    # fits on a secondary x axis
    with_tokens = [r for r in records if r.get("tokens") and r.get("step")]
    title = "loss"
    if with_tokens:
        last = with_tokens[-1]
        per_step = last["tokens"] / last["step"]
        sec = ax.secondary_xaxis("top", functions=(lambda s: s * per_step, lambda t: t / per_step))
        sec.set_xlabel("tokens")
        title = f"loss — {last['tokens']:,} tokens over {last['step']} steps"
    ax.set_title(title)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, format="png")
    return png_path
