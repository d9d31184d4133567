"""Loss against compute, fitted per architecture: L(C) = E + A * C^(-alpha).

E is the irreducible loss the architecture approaches, A and alpha how fast it gets there
(Kaplan et al. 2020; Hoffmann et al. 2022). The fit is scipy's `curve_fit` (trust-region
least squares with bounds) on every (budget, seed) point, in the form E + exp(a - alpha * x)
with x = ln(C / C_ref), which keeps the numbers near 1. Its uncertainty comes from the seeds:
a bootstrap resamples the seeds at each budget (with replacement, deviations rescaled for the
small sample) and refits, and the 2.5th and 97.5th percentiles of each quantity are its 95 %
interval. One seed gives a fit without intervals. With two or three seeds a percentile
bootstrap cannot show the t distribution's heavy tails: read those intervals as a lower bound
on the uncertainty.

A target budget beyond the ladder is an extrapolation: FAR_FACTOR (10x, one decade past the
largest measured budget) is where we warn, because there alpha's uncertainty already moves the
prediction by more than the differences between architectures that a ladder of tiny budgets
resolves.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import optimize

FAR_FACTOR = 10.0
BOOTSTRAP = 400
Z_PERCENTILES = (2.5, 97.5)


def law(c, e: float, a_log: float, alpha: float, c_ref: float):
    """E + exp(a_log - alpha ln(C / C_ref)), i.e. E + A C^-alpha with A = exp(a_log) C_ref^alpha."""
    return e + np.exp(a_log - alpha * np.log(np.asarray(c, dtype=float) / c_ref))


def _fit_points(cs: np.ndarray, losses: np.ndarray, c_ref: float) -> tuple[float, float, float] | None:
    lo = float(losses.min())
    p0 = (0.5 * lo, math.log(max(float(losses.max()) - 0.5 * lo, 1e-6)), 0.3)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an ill-determined covariance is not our interval
            popt, _ = optimize.curve_fit(
                lambda c, e, a, al: law(c, e, a, al, c_ref), cs, losses, p0=p0,
                bounds=([0.0, -20.0, 0.0], [lo, 20.0, 3.0]), method="trf", maxfev=20000,
            )
    except (RuntimeError, ValueError):
        return None
    return float(popt[0]), float(popt[1]), float(popt[2])


class Fit:
    """One architecture's law, with bootstrap draws over its seeds."""

    def __init__(self, points: list[tuple[float, float, int]], seed: int = 0, bootstrap: int = BOOTSTRAP):
        # points: (compute, loss, seed index)
        self.points = points
        cs = np.array([p[0] for p in points], dtype=float)
        ls = np.array([p[1] for p in points], dtype=float)
        self.c_ref = float(np.exp(np.log(cs).mean()))
        self.params = _fit_points(cs, ls, self.c_ref)
        self.draws: list[tuple[float, float, float]] = []
        budgets = sorted({p[0] for p in points})
        by_budget = {b: [p for p in points if p[0] == b] for b in budgets}
        if self.params is None or max(len(v) for v in by_budget.values()) < 2:
            return
        # each budget's seeds resampled with replacement, their deviations from the budget's mean
        # scaled by sqrt(n / (n - 1)), so that a resample's mean varies as much as the mean of n
        # seeds does (the plain bootstrap shrinks that variance by (n - 1) / n: half at two seeds)
        rng = np.random.default_rng(seed)
        groups = []
        for v in by_budget.values():
            xs = np.array([p[0] for p in v])
            ls = np.array([p[1] for p in v])
            scale = math.sqrt(len(v) / (len(v) - 1)) if len(v) > 1 else 0.0
            groups.append((xs, ls.mean(), scale * (ls - ls.mean())))
        for _ in range(bootstrap):
            cs_b, ls_b = [], []
            for xs, mean, dev in groups:
                pick = rng.integers(0, len(xs), len(xs))
                cs_b.append(xs[pick])
                ls_b.append(mean + dev[pick])
            got = _fit_points(np.concatenate(cs_b), np.concatenate(ls_b), self.c_ref)
            if got is not None:
                self.draws.append(got)

    @property
    def ok(self) -> bool:
        return self.params is not None

    def predict(self, c) -> np.ndarray:
        return law(c, *self.params, self.c_ref)

    def band(self, c) -> tuple[np.ndarray, np.ndarray] | None:
        """The 95 % band of the curve at compute c (None without bootstrap draws)."""
        if not self.draws:
            return None
        curves = np.stack([law(c, *d, self.c_ref) for d in self.draws])
        lo, hi = np.percentile(curves, Z_PERCENTILES, axis=0)
        return lo, hi

    def summary(self) -> dict:
        """E, A, alpha (A for C in FLOPs: L = E + A C^-alpha) with their intervals."""
        def a_of(p):
            return math.exp(p[1] + p[2] * math.log(self.c_ref))

        out = {"E": self.params[0], "A": a_of(self.params), "alpha": self.params[2], "c_ref": self.c_ref,
               "points": len(self.points), "bootstrap": len(self.draws)}
        if self.draws:
            for key, values in (("E", [d[0] for d in self.draws]), ("A", [a_of(d) for d in self.draws]),
                                ("alpha", [d[2] for d in self.draws])):
                lo, hi = np.percentile(values, Z_PERCENTILES)
                out[f"{key}_interval"] = [float(lo), float(hi)]
        return out

    def prediction(self, c: float) -> dict:
        out = {"loss": float(self.predict(c))}
        band = self.band(np.array([c]))
        if band is not None:
            out["interval"] = [float(band[0][0]), float(band[1][0])]
        return out


def crossings(a: Fit, b: Fit, lo: float, hi: float, points: int = 400) -> list[float]:
    """The computes in [lo, hi] where the two fitted curves cross (sign changes of their
    difference on a log grid, refined by Brent's method)."""
    grid = np.geomspace(lo, hi, points)
    diff = a.predict(grid) - b.predict(grid)
    found = []
    for i in range(points - 1):
        if diff[i] == 0:
            found.append(float(grid[i]))
        elif diff[i] * diff[i + 1] < 0:
            root = optimize.brentq(lambda x: float(a.predict(math.exp(x)) - b.predict(math.exp(x))),
                                   math.log(grid[i]), math.log(grid[i + 1]))
            found.append(math.exp(root))
    return found
