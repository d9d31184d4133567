"""sweep.md: the leaderboard of every budget with intervals over the seeds, rank stability, the
fitted laws and the predictions at the target budget."""

from __future__ import annotations

import os

from speedlm.compare.scaling import FAR_FACTOR
from speedlm.compare.stats import LEVEL


def _budget(value: float, kind: str) -> str:
    return f"{value:g} s" if kind == "time" else f"{value:.3g} FLOPs"


def _pm(stat: dict | None, fmt: str) -> str:
    """mean ± half-width (mean alone for one seed)."""
    if not stat or stat.get("mean") is None:
        return "-"
    if stat.get("lo") is None or stat["hi"] == stat["lo"]:  # one seed, or the same value every time
        return format(stat["mean"], fmt)
    return f"{format(stat['mean'], fmt)} ± {format((stat['hi'] - stat['lo']) / 2, fmt)}"


def _interval(stat: dict | None, fmt: str) -> str:
    if not stat or stat.get("lo") is None:
        return "-"
    return f"[{format(stat['lo'], fmt)}, {format(stat['hi'], fmt)}]"


def leaderboards_markdown(report: dict) -> str:
    kind = report["kind"]
    seeds = report["seeds"]
    out = []
    for b in report["budgets"]:
        by_name = {e["name"]: e for e in b["models"]}
        out += [f"### {_budget(b['budget'], kind)}", "",
                f"| # | model | d_model | active non-emb params | val loss (mean ± {LEVEL:.0%} half-width) | "
                f"{LEVEL:.0%} interval | vs next | MQAR acc | steps | train tok/s | rank per seed |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        stab = b.get("rank_stability") or {}
        for i, name in enumerate(b["leaderboard"], 1):
            e = by_name[name]
            sep = e.get("separated_from_next")
            vs = "-" if i == len(b["leaderboard"]) else ("separated" if sep else "tied" if sep is False else "one seed")
            ranks = ", ".join(str(r) for r in (stab.get("ranks") or {}).get(name, [])) or "-"
            bound = " (bound)" if e.get("bound") else ""
            out.append(
                f"| {i} | {name} | {e['d_model']} | {e['params_active_non_embedding']:,} | "
                f"{_pm(e['val_loss'], '.4f')}{bound} | {_interval(e['val_loss'], '.4f')} | {vs} | "
                f"{_pm(e.get('mqar_accuracy'), '.3f')} | {_pm(e.get('steps'), '.0f')} | "
                f"{_pm(e.get('train_tok_per_s'), ',.0f')} | {ranks} |")
        missing = [e["name"] for e in b["models"] if not e["runs"]]
        if missing:
            out.append(f"\nDid not finish at this budget: {', '.join(missing)} (see each run's report).")
        if stab and stab.get("kendall_tau_mean") is not None:
            out.append(f"\nRank stability across the {len(seeds)} seeds: Kendall's tau "
                       f"{stab['kendall_tau_mean']:.2f} on average over seed pairs (1: the same order every time).")
        out.append("")
    return "\n".join(out)


def fits_markdown(report: dict) -> str:
    fits = report["fits"]
    if fits.get("note"):
        return fits["note"] + "."
    kind = report["kind"]
    unit = "seconds" if kind == "time" else "FLOPs"
    lines = [f"L(C) = E + A C^-alpha, C in training {unit}; fitted by scipy's curve_fit on every (budget, seed) point; "
             "95 % intervals: Student's t at the fit's residual degrees of freedom (points - 3) times the standard "
             "error from curve_fit's covariance, which the seeds' scatter about the law sets (predictions through the "
             "law's gradient). E is bounded below by 0.", "",
             "| model | E | E interval | A | A interval | alpha | alpha interval | points |", "|---|---|---|---|---|---|---|---|"]
    for name, f in fits["models"].items():
        if not f.get("ok"):
            lines.append(f"| {name} | no fit: {f['reason']} | | | | | | |")
            continue
        ei, ai, aa = f.get("E_interval"), f.get("alpha_interval"), f.get("A_interval")
        lines.append(f"| {name} | {f['E']:.3f} | {f'[{ei[0]:.3f}, {ei[1]:.3f}]' if ei else '-'} | {f['A']:.3g} | "
                     f"{f'[{aa[0]:.3g}, {aa[1]:.3g}]' if aa else '-'} | "
                     f"{f['alpha']:.3f} | {f'[{ai[0]:.3f}, {ai[1]:.3f}]' if ai else '-'} | {f['points']} |")
    target = fits.get("target")
    if target:
        lines += ["", f"**Predicted at {_budget(target['budget'], kind)}** "
                  f"({target['factor_beyond_ladder']:.3g}x the largest budget measured):", ""]
        if target["far"]:
            lines += [f"> Warning: more than {FAR_FACTOR:g}x beyond the ladder. The fit's alpha is uncertain enough "
                      "there that these predictions say less than the intervals suggest; measure a larger budget.", ""]
        lines += ["| rank | model | predicted loss | 95 % interval |", "|---|---|---|---|"]
        for i, name in enumerate(target["ranking"], 1):
            p = target["predictions"][name]
            iv = p.get("interval")
            lines.append(f"| {i} | {name} | {p['loss']:.4f} | {f'[{iv[0]:.4f}, {iv[1]:.4f}]' if iv else '-'} |")
    lo, hi = fits.get("crossings_range", [None, None])
    if fits.get("crossings"):
        lines += ["", f"Where two fits cross between {_budget(lo, kind)} and {_budget(hi, kind)} (the order of the "
                  "two models changes there):", ""]
        lines += [f"- {c['models'][0]} and {c['models'][1]}: {_budget(c['budget'], kind)}" for c in fits["crossings"]]
    elif lo is not None:
        lines += ["", f"No two fits cross between {_budget(lo, kind)} and {_budget(hi, kind)}."]
    return "\n".join(lines)


def sweep_markdown(report: dict, plots: dict[str, str]) -> str:
    opts = report["options"]
    kind = report["kind"]
    lines = [
        "# speedlm compare: scaling sweep", "",
        f"Command: `{opts['command']}`", "",
        f"{len(report['presets'])} models x {len(report['ladder'])} budgets "
        f"({', '.join(_budget(v, kind) for v in report['ladder'])}) x {len(report['seeds'])} seeds "
        f"({', '.join(str(s) for s in report['seeds'])}); {opts['executor']} executor. A seed changes the "
        "initialisation, the batch order and the MQAR data; the validation set is the same for all. Each (budget, "
        "seed) is one compare run with its own report under `runs/`.", "",
        f"Intervals are {LEVEL:.0%} Student-t intervals of the mean over the seeds (two seeds give wide intervals: "
        "that is what two seeds can tell). Neighbours are *separated* when their intervals do not overlap and *tied* "
        "when they do. Timing columns are means and carry no interval.", "",
        "## Leaderboards", "",
        leaderboards_markdown(report),
        "## Loss against compute", "",
        fits_markdown(report), "",
    ]
    if plots:
        lines += [f"![{key}]({os.path.basename(path)})" for key, path in plots.items()]
        lines.append("")
    return "\n".join(lines)
