"""Statistics over seeds: a mean and a 95 % interval per figure, which neighbours on a
leaderboard are separated beyond their intervals, and how stable the ranking is across seeds.

The interval is Student's t interval of the mean (the seeds are a small sample: two seeds give
a wide interval, and that width is the honest answer). One seed has no interval.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from scipy import stats

LEVEL = 0.95


def mean_interval(values, level: float = LEVEL) -> dict:
    """{"mean", "lo", "hi", "n", "values"} of the finite values (lo = hi = None below two)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return {"mean": None, "lo": None, "hi": None, "n": 0, "values": []}
    mean = float(np.mean(xs))
    if len(xs) < 2:
        return {"mean": mean, "lo": None, "hi": None, "n": 1, "values": xs}
    half = float(stats.t.ppf(0.5 + level / 2, len(xs) - 1) * np.std(xs, ddof=1) / math.sqrt(len(xs)))
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": len(xs), "values": xs}


def separated(a: dict, b: dict) -> bool | None:
    """Whether two figures' intervals are disjoint (None: one of them has no interval)."""
    if a.get("lo") is None or b.get("lo") is None:
        return None
    return a["hi"] < b["lo"] or b["hi"] < a["lo"]


def ranks(losses: dict[str, float]) -> dict[str, int]:
    """1-based ranks by ascending value (ties broken by name, so a ranking is a permutation)."""
    order = sorted(losses, key=lambda k: (losses[k], k))
    return {k: i for i, k in enumerate(order, 1)}


def rank_stability(per_seed: list[dict[str, float]]) -> dict:
    """Per model its rank under each seed, and Kendall's tau between every two seeds' rankings
    of the models all of them finished (1: the same order every time)."""
    common = sorted(set.intersection(*(set(d) for d in per_seed))) if per_seed else []
    ranked = [ranks({k: d[k] for k in common}) for d in per_seed]
    taus = []
    for a, b in itertools.combinations(ranked, 2):
        if len(common) >= 2:
            taus.append(float(stats.kendalltau([a[k] for k in common], [b[k] for k in common]).statistic))
    return {
        "ranks": {k: [r[k] for r in ranked] for k in common},
        "kendall_tau": taus,
        "kendall_tau_mean": float(np.mean(taus)) if taus else None,
    }
