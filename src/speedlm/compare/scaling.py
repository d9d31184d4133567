"""Loss against compute, fitted per architecture: L(C) = E + A * C^(-alpha).

E is the irreducible loss the architecture approaches, A and alpha how fast it gets there
(Kaplan et al. 2020; Hoffmann et al. 2022). The fit is scipy's `curve_fit` (trust-region
least squares with bounds) on every (budget, seed) point, in the form E + exp(a - alpha * x)
with x = ln(C / C_ref), which keeps the numbers near 1.

Intervals. The points at one budget differ only by their seed, so the scatter of the points
about the law is the seeds' scatter (plus any misfit of the law). `curve_fit`'s covariance scales
the Jacobian by that residual variance; a 95 % interval is Student's t at the residual degrees of
freedom (points - 3) times the standard error: for E, alpha and ln A directly, for a predicted
loss through the gradient of the law (the delta method). Few points give few degrees of freedom
and wide intervals, as they should; more seeds narrow them. A fit with no more points than
parameters has no interval. (We tried a bootstrap over the seeds first: with two seeds it
resamples three distinct means per budget and gave intervals narrower than three seeds' did.)

A target budget beyond the ladder is an extrapolation: FAR_FACTOR (10x, one decade past the
largest measured budget) is where we warn, because there alpha's uncertainty already moves the
prediction by more than the differences between architectures that a ladder of tiny budgets
resolves.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import optimize, stats

FAR_FACTOR = 10.0
LEVEL = 0.95


def law(c, e: float, a_log: float, alpha: float, c_ref: float):
    """E + exp(a_log - alpha ln(C / C_ref)), i.e. E + A C^-alpha with A = exp(a_log) C_ref^alpha."""
    return e + np.exp(a_log - alpha * np.log(np.asarray(c, dtype=float) / c_ref))


def _fit_points(cs: np.ndarray, losses: np.ndarray, c_ref: float):
    """(params, covariance) of the least-squares law, or None when the fit fails."""
    lo = float(losses.min())
    p0 = (0.5 * lo, math.log(max(float(losses.max()) - 0.5 * lo, 1e-6)), 0.3)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an infinite covariance (no degrees of freedom) is handled below
            popt, pcov = optimize.curve_fit(
                lambda c, e, a, al: law(c, e, a, al, c_ref), cs, losses, p0=p0,
                bounds=([0.0, -20.0, 0.0], [lo, 20.0, 3.0]), method="trf", maxfev=20000,
            )
    except (RuntimeError, ValueError):
        return None
    return popt, pcov


class Fit:
    """One architecture's law and its t intervals."""

    def __init__(self, points: list[tuple[float, float, int]]):
        # points: (compute, loss, seed index)
        self.points = points
        cs = np.array([p[0] for p in points], dtype=float)
        ls = np.array([p[1] for p in points], dtype=float)
        self.c_ref = float(np.exp(np.log(cs).mean()))
        got = _fit_points(cs, ls, self.c_ref)
        self.params = None if got is None else tuple(float(v) for v in got[0])
        self.dof = len(points) - 3
        self.cov = None
        if got is not None and self.dof >= 1 and np.all(np.isfinite(got[1])):
            self.cov = np.asarray(got[1])
        self.t = float(stats.t.ppf(0.5 + LEVEL / 2, self.dof)) if self.dof >= 1 else None

    @property
    def ok(self) -> bool:
        return self.params is not None

    def predict(self, c) -> np.ndarray:
        return law(c, *self.params, self.c_ref)

    def _gradient(self, c) -> np.ndarray:
        """d L / d (E, a, alpha) at compute c, one row per c."""
        x = np.log(np.atleast_1d(np.asarray(c, dtype=float)) / self.c_ref)
        f = np.exp(self.params[1] - self.params[2] * x)
        return np.stack([np.ones_like(f), f, -x * f], axis=1)

    def band(self, c) -> tuple[np.ndarray, np.ndarray] | None:
        """The 95 % interval of the fitted curve at compute c (None without degrees of freedom)."""
        if self.cov is None:
            return None
        g = self._gradient(c)
        half = self.t * np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", g, self.cov, g), 0.0))
        mid = self.predict(np.atleast_1d(c))
        return np.maximum(mid - half, 0.0), mid + half

    def summary(self) -> dict:
        """E, A, alpha (A for C in FLOPs: L = E + A C^-alpha) with their intervals."""
        e, a, alpha = self.params
        log_c = math.log(self.c_ref)
        out = {"E": e, "A": math.exp(a + alpha * log_c), "alpha": alpha, "c_ref": self.c_ref,
               "points": len(self.points), "dof": self.dof}
        if self.cov is not None:
            se = np.sqrt(np.maximum(np.diag(self.cov), 0.0))
            out["E_interval"] = [max(0.0, e - self.t * se[0]), e + self.t * se[0]]
            out["alpha_interval"] = [max(0.0, alpha - self.t * se[2]), alpha + self.t * se[2]]
            # ln A = a + alpha ln C_ref
            g = np.array([0.0, 1.0, log_c])
            half = self.t * math.sqrt(max(float(g @ self.cov @ g), 0.0))
            out["A_interval"] = [math.exp(a + alpha * log_c - half), math.exp(a + alpha * log_c + half)]
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
