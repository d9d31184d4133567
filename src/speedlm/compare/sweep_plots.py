"""The sweep's plot: validation loss against training compute on log axes, every (budget, seed)
point, each model's fitted law and its 95 % band, and the target budget where one was given."""

from __future__ import annotations

import os

import numpy as np

from speedlm.bench.styles import figure, legend, model_family, plain_numbers, series_styles, settle

PLOT = "scaling_loss_vs_compute.png"


def write_sweep_plots(report: dict, out_dir: str) -> dict[str, str]:
    fits = report["fits"]
    curves = fits.get("_fits", {})
    names = report["presets"]
    styles = series_styles(names, [_family(n) for n in names])
    kind = report["kind"]
    fig, (ax,) = figure(8.6, 4.8)
    lines = []
    xs_all = []
    for name in names:
        pts = [(x, loss) for b in report["budgets"] for e in b["models"] if e["name"] == name and e["runs"]
               for x, loss in zip(e["train_flops"]["values"] if kind == "flops" else [b["budget"]] * e["runs"],
                                  e["val_loss"]["values"])]
        if not pts:
            continue
        xs_all += [p[0] for p in pts]
        style = styles[name]
        lines += ax.plot(*zip(*pts), label=name, linestyle="none", markersize=5, color=style.colour, marker=style.marker)
    hi = max(xs_all) if xs_all else 1.0
    target = (fits.get("target") or {}).get("budget")
    if target:
        hi = max(hi, target)
    if xs_all:
        grid = np.geomspace(min(xs_all) / 1.2, hi * 1.2, 200)
        for name, fit in curves.items():
            style = styles[name]
            ax.plot(grid, fit.predict(grid), color=style.colour, linestyle=style.linestyle, linewidth=1.2)
            band = fit.band(grid)
            if band is not None:
                ax.fill_between(grid, band[0], band[1], color=style.colour, alpha=0.15, linewidth=0)
    if target:
        ax.axvline(target, color="grey", linestyle=":")
        ax.text(target, 0.98, " target", color="grey", fontsize=7, va="top", transform=ax.get_xaxis_transform())
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training seconds on this machine (log scale)" if kind == "time" else "training FLOPs (log scale)")
    ax.set_ylabel("validation loss (nats/token; log scale)")
    ax.grid(True, which="both", alpha=0.3)
    plain_numbers(ax)
    if lines:
        legend(fig, styles, [line.get_label() for line in lines])
    else:
        ax.text(0.5, 0.5, "no finished run", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(f"loss vs compute: {len(report['seeds'])} seed(s) per budget,\n"
                 r"fits $L = E + A\,C^{-\alpha}$ with 95% bands")
    settle(fig)
    path = os.path.join(out_dir, PLOT)
    fig.savefig(path, dpi=110)
    return {"scaling": path}


def _family(name: str) -> str:
    try:
        return model_family(name)
    except Exception:  # noqa: BLE001 - a config that does not load still gets a style
        return "unknown"
