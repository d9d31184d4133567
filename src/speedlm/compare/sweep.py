"""A scaling study from `speedlm compare`: every model at several budgets and seeds, each run an
ordinary compare, then statistics over the seeds and a fitted loss-vs-compute law per model.

Runs. A (budget, seed) pair is one compare run in `<out>/runs/<budget>-seed<seed>/`, with its
own report, checkpoints and resume (compare/resume.py): a killed sweep rerun with the same
arguments reuses every finished model of every run. Seeds are `seed, seed + 1, ...`: a seed
changes the initialisation, the order of the training batches and the MQAR data; the validation
set is the same for all. An executor runs the runs (compare/executors.py): one process after
another (`local`) or as Ray tasks.

Sizes. With a FLOP ladder, the first model's width at each budget is
the one whose tokens per active non-embedding parameter come closest to `--tokens-per-param`
(default 20, see DEFAULT_TOKENS_PER_PARAM), and the others are
matched to it on active non-embedding parameters as in every compare; so each budget's points
sit near each architecture's compute-efficient frontier instead of on one fixed width. With
`--match-params none`, and on a time ladder, every budget keeps the preset sizes.

Statistics and fits: compare/stats.py (means and t intervals, separated neighbours, rank
stability) and compare/scaling.py (L(C) = E + A C^-alpha, t intervals from the seeds' scatter).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from speedlm.bench.common import as_list
from speedlm.compare.executors import check_executor, run_all
from speedlm.compare.report import jsonable
from speedlm.compare.resume import open_plan, save_plan
from speedlm.compare.run import TIMING_FIELDS, CompareOptions, _check_options, _options_dict
from speedlm.compare.scaling import FAR_FACTOR, Fit, crossings
from speedlm.compare.stats import mean_interval, rank_stability, separated
from speedlm.data.cachedir import atomic_write_text
from speedlm.errors import SpeedlmError
from speedlm.models.build import is_checkpoint
from speedlm.schema import is_number

SWEEP_PLAN = "sweep_plan.json"
SWEEP_JSON = "sweep.json"
SWEEP_MD = "sweep.md"
MIN_FIT_BUDGETS = 3  # three parameters: fewer budgets cannot determine the law


@dataclass
class SweepOptions:
    compare: CompareOptions  # everything else (presets, data, batch, ...); its budget and seed are the ladder's
    budgets: list | None = None  # FLOP ladder (increasing)
    time_budgets: list | None = None  # seconds ladder (increasing), instead of FLOPs
    seeds: int = 1
    target_budget: float | None = None  # predict every model's loss here
    executor: str = "local"
    cpus_per_run: float | None = None
    gpus_per_run: float | None = None
    ray_address: str | None = None

    @property
    def ladder(self) -> list:
        return list(self.time_budgets if self.time_budgets is not None else self.budgets or [self.compare.budget])

    @property
    def by_time(self) -> bool:
        return self.time_budgets is not None

    def seed_list(self) -> list[int]:
        return [self.compare.seed + i for i in range(self.seeds)]


def _check_ladder(name: str, values) -> list[float]:
    values = list(values)
    if not values or not all(is_number(v) and 0 < v < float("inf") for v in values):
        raise SpeedlmError(f"{name} must be positive numbers, got {values!r}")
    if any(b <= a for a, b in zip(values, values[1:])):
        raise SpeedlmError(f"{name} must increase, got {', '.join(f'{v:g}' for v in values)}")
    return [float(v) for v in values]


# Tokens per active non-embedding parameter that size a FLOP ladder's first model when the user
# gives none: Hoffmann et al. (2022) find compute-optimal training near 20 tokens per parameter,
# so each budget's points sit near the frontier and the fit describes it, rather than one fixed
# width that saturates at the larger budgets (our tiny models count non-embedding parameters,
# Kaplan-style; Chinchilla counted all of them)
DEFAULT_TOKENS_PER_PARAM = 20.0


def check_sweep(s: SweepOptions) -> None:
    """One-line errors for bad sweep arguments, before any work; a FLOP ladder matched on the
    first model gets DEFAULT_TOKENS_PER_PARAM unless given."""
    if s.budgets is not None and s.time_budgets is not None:
        raise SpeedlmError("give either --budgets (training FLOPs) or --time-budgets (seconds), not both")
    if s.budgets is not None:
        if s.compare.budget is not None or s.compare.time_budget is not None:
            raise SpeedlmError("--budgets replaces --budget and --time-budget; give one of them")
        s.budgets = _check_ladder("--budgets", s.budgets)
    if s.time_budgets is not None:
        if s.compare.budget is not None or s.compare.time_budget is not None:
            raise SpeedlmError("--time-budgets replaces --budget and --time-budget; give one of them")
        s.time_budgets = _check_ladder("--time-budgets", s.time_budgets)
    if not (isinstance(s.seeds, int) and not isinstance(s.seeds, bool) and s.seeds >= 1):
        raise SpeedlmError(f"--seeds must be an integer >= 1, got {s.seeds!r}")
    if s.target_budget is not None:
        if not (is_number(s.target_budget) and 0 < s.target_budget < float("inf")):
            raise SpeedlmError(f"--target-budget must be a positive number, got {s.target_budget!r}")
        if len(s.budgets or s.time_budgets or []) < MIN_FIT_BUDGETS:
            raise SpeedlmError(f"--target-budget needs a ladder of at least {MIN_FIT_BUDGETS} budgets to fit "
                               "(--budgets A,B,C or --time-budgets A,B,C)")
        if s.target_budget < s.ladder[0]:
            raise SpeedlmError(f"--target-budget {s.target_budget:g} is below the ladder (smallest budget "
                               f"{s.ladder[0]:g}): predict inside or beyond what was measured")
    check_executor(s.executor, s.cpus_per_run, s.gpus_per_run, s.ray_address)
    pretrained = [p for p in as_list(s.compare.presets, "presets") if isinstance(p, str) and is_checkpoint(p)]
    if pretrained:  # a sweep fits loss against the budget it trains for; a checkpoint is not trained
        raise SpeedlmError(f"{pretrained[0]} is a checkpoint folder, measured as saved: a sweep trains its models at "
                           "each budget; compare it without --budgets/--time-budgets/--seeds")
    if s.budgets is not None and s.compare.match == "first" and s.compare.tokens_per_param is None:
        s.compare.tokens_per_param = DEFAULT_TOKENS_PER_PARAM
    # the compare options of the first run check everything else
    _check_options(run_options(s, s.ladder[0], s.seed_list()[0]))


def is_sweep(s: SweepOptions) -> bool:
    """Whether these options ask for more than one compare run (or for a sweep's own options:
    checked and refused by `check_sweep` where they make no sense)."""
    return (s.seeds != 1 or s.budgets is not None or s.time_budgets is not None or s.executor != "local"
            or s.target_budget is not None or s.cpus_per_run is not None or s.gpus_per_run is not None
            or s.ray_address is not None)


def run_label(value: float, seed: int, by_time: bool) -> str:
    return f"{value:g}{'s' if by_time else 'flops'}-seed{seed}".replace("+", "")


def run_options(s: SweepOptions, value: float, seed: int) -> CompareOptions:
    o = s.compare
    return dataclasses.replace(
        o, budget=None if s.by_time else value, time_budget=value if s.by_time else None, seed=seed,
        out_dir=os.path.join(o.out_dir, "runs", run_label(value, seed, s.by_time)),
        mqar=dataclasses.replace(o.mqar) if o.mqar is not None else None,
        command=o.command,
    )


def _fingerprint(s: SweepOptions) -> dict:
    """What every run of the sweep shares. The ladder and the seeds are not in it: a rerun with
    more budgets or seeds into the same folder reuses the runs it has (each run checks its own
    arguments) and reports over the ladder and seeds it was given."""
    return {"by_time": s.by_time,
            "compare": {k: v for k, v in _options_dict(s.compare).items() if k not in ("budget", "time_budget", "seed")}}


# ----------------------------------------------------------------------------- the job


def run_sweep(s: SweepOptions, progress: bool = True) -> dict:
    """Run every (budget, seed) compare (skipping what an earlier run of the same sweep
    finished), then aggregate: sweep.json, sweep.md and the scaling plot in the output folder.
    Returns the sweep report."""
    check_sweep(s)
    out = s.compare.out_dir
    fingerprint = _fingerprint(s)
    reuse = open_plan(out, fingerprint, s.compare.resume, plan_file=SWEEP_PLAN)
    save_plan(out, fingerprint, {}, plan_file=SWEEP_PLAN)
    runs = [(value, seed) for value in s.ladder for seed in s.seed_list()]
    print(f"sweep: {len(s.compare.presets)} models x {len(s.ladder)} budgets x {s.seeds} seeds = "
          f"{len(runs) * len(s.compare.presets)} trainings in {len(runs)} compare runs ({s.executor} executor)"
          + ("; resuming" if reuse else ""))
    options = [run_options(s, value, seed) for value, seed in runs]
    for o in options:
        o.resume = False  # each run resumes itself when its own plan is there
    reports = run_all(options, s, progress)
    report = aggregate(s, reports)
    write_sweep(report, out)
    print(sweep_markdown_leaderboards(report))
    return report


# ----------------------------------------------------------------------------- aggregation


def _numeric_fields(rows: list[dict]) -> list[str]:
    keys = []
    for r in rows:
        for k, v in r.items():
            if k not in keys and is_number(v) and not isinstance(v, bool):
                keys.append(k)
    return keys


def aggregate(s: SweepOptions, reports: list[dict]) -> dict:
    """The sweep report: per budget and model the figures over seeds (mean, 95 % interval,
    values; timing fields their mean and values), the leaderboards with separated neighbours,
    rank stability, and per model the fitted law with predictions."""
    seeds = s.seed_list()
    by_run = {(r["_value"], r["_seed"]): r for r in reports}
    names = list(s.compare.presets)
    budgets = []
    for value in s.ladder:
        models = {}
        per_seed_loss = []
        for seed in seeds:
            rep = by_run.get((value, seed))
            rows = {m["name"]: m for m in (rep or {}).get("models", []) if m.get("status") == "ok"}
            per_seed_loss.append({n: rows[n]["val_loss"] for n in rows})
            for n in names:
                if n in rows:
                    models.setdefault(n, []).append(rows[n])
        entries = []
        for n in names:
            rows = models.get(n, [])
            entry = {"name": n, "runs": len(rows), "seeds": seeds}
            if rows:
                for k in _numeric_fields(rows):
                    stat = mean_interval([r.get(k) for r in rows])
                    if k in TIMING_FIELDS:  # measured times: a mean, never an interval
                        stat = {"mean": stat["mean"], "values": stat["values"], "timing": True}
                    entry[k] = stat
                # the size is the plan's, the same for every seed
                entry["d_model"] = rows[0]["d_model"]
                entry["params_active_non_embedding"] = rows[0]["params_active_non_embedding"]
                entry["bound"] = bool(rows[0].get("bound"))
            entries.append(entry)
        ranked = sorted([e for e in entries if e["runs"]], key=lambda e: e["val_loss"]["mean"])
        for a, b in zip(ranked, ranked[1:]):
            a["separated_from_next"] = separated(a["val_loss"], b["val_loss"])
        budgets.append({"budget": value, "leaderboard": [e["name"] for e in ranked], "models": entries,
                        "rank_stability": rank_stability(per_seed_loss) if len(seeds) > 1 else None})
    report = {
        "kind": "time" if s.by_time else "flops",
        "ladder": s.ladder, "seeds": seeds, "presets": names,
        "options": {**_fingerprint(s), "ladder": s.ladder, "seeds": s.seed_list(), "target_budget": s.target_budget,
                    "executor": s.executor,
                    "out_dir": s.compare.out_dir, "command": s.compare.command},
        "budgets": budgets,
        "runs": [{"budget": r["_value"], "seed": r["_seed"], "out_dir": r["meta"]["options"]["out_dir"]} for r in reports],
    }
    report["fits"] = _fits(s, budgets, names)
    return report


def _fits(s: SweepOptions, budgets: list[dict], names: list[str]) -> dict:
    out: dict = {"min_budgets": MIN_FIT_BUDGETS, "models": {}}
    if len(s.ladder) < MIN_FIT_BUDGETS:
        out["note"] = f"no fit: {len(s.ladder)} budget(s), a law needs at least {MIN_FIT_BUDGETS}"
        return out
    fits = {}
    for n in names:
        points = []
        for b in budgets:
            e = next(x for x in b["models"] if x["name"] == n)
            if not e["runs"]:
                continue
            for i, (loss, x) in enumerate(zip(e["val_loss"]["values"], _run_x(e, b["budget"], s.by_time))):
                points.append((x, loss, i))
        if len({p[0] for p in points}) < MIN_FIT_BUDGETS:
            out["models"][n] = {"ok": False, "reason": f"finished at {len({p[0] for p in points})} budget(s)"}
            continue
        fit = Fit(points)
        if not fit.ok:
            out["models"][n] = {"ok": False, "reason": "the least-squares fit did not converge"}
            continue
        fits[n] = fit
        out["models"][n] = {"ok": True, **fit.summary(), "points_xy": [[p[0], p[1]] for p in points]}
    out["_fits"] = fits  # not written (report writers drop it); the plot draws the curves from them
    lo, hi = s.ladder[0], s.ladder[-1]
    if s.target_budget is not None:
        target = s.target_budget
        preds = {n: f.prediction(target) for n, f in fits.items()}
        out["target"] = {
            "budget": target,
            "far": target > FAR_FACTOR * hi,
            "factor_beyond_ladder": target / hi,
            "predictions": preds,
            "ranking": sorted(preds, key=lambda n: preds[n]["loss"]),
        }
        hi = max(hi, target)
    out["crossings"] = []
    ordered = list(fits)
    for i, a in enumerate(ordered):
        for b in ordered[i + 1:]:
            for c in crossings(fits[a], fits[b], lo, hi):
                out["crossings"].append({"models": [a, b], "budget": c})
    out["crossings_range"] = [lo, hi]
    return out


def _run_x(entry: dict, value: float, by_time: bool) -> list[float]:
    """Each seed's compute at this budget (FLOPs spent, or the seconds given)."""
    if by_time:
        return [value] * len(entry["val_loss"]["values"])
    return entry["train_flops"]["values"]


# ----------------------------------------------------------------------------- writing


def write_sweep(report: dict, out_dir: str) -> dict[str, str]:
    from speedlm.compare.sweep_report import sweep_markdown
    from speedlm.compare.sweep_plots import write_sweep_plots

    plots = write_sweep_plots(report, out_dir)
    files = {"json": os.path.join(out_dir, SWEEP_JSON), "md": os.path.join(out_dir, SWEEP_MD), **plots}
    atomic_write_text(files["json"], json.dumps(jsonable(report), indent=2) + "\n")
    atomic_write_text(files["md"], sweep_markdown(report, plots))
    report["files"] = files
    print(f"wrote {', '.join(files.values())}")
    return files


def sweep_markdown_leaderboards(report: dict) -> str:
    from speedlm.compare.sweep_report import leaderboards_markdown

    return leaderboards_markdown(report)


__all__ = ["SweepOptions", "check_sweep", "is_sweep", "run_sweep", "aggregate", "MIN_FIT_BUDGETS"]
