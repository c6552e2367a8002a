"""Scaling-law fits with bootstrap confidence intervals.

Two forms, in x = the swept size (codebook size K, usually):
- `power`, for metrics that fall towards a floor (recon_mse vs K):  y = E + A * x^(-alpha);
- `saturating`, for fractions that fall from 1 as x grows (utilization vs K):
  y = 1 / (1 + (x / x50)^beta), where x50 is where half the codes are used.

Each fit is a robust least-squares fit (soft-L1 loss: one bad seed does not drag the
curve) from several starting points, keeping the best. The 95% intervals come from a
percentile bootstrap over the rows -- (point, seed) pairs -- refitting each resample.
"Collapse onset" is the x at which the saturating fit crosses a threshold (default 0.5):
x50 * (1/threshold - 1)^(1/beta), with its bootstrap interval.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import least_squares

FORMS = ("power", "saturating")


@dataclass
class Fit:
    form: str
    params: dict[str, float]                    # power: E, A, alpha; saturating: x50, beta
    ci: dict[str, tuple[float, float]]          # 95% bootstrap intervals of the same
    r2: float
    n: int                                      # rows fitted (points x seeds)
    x_range: tuple[float, float]
    samples: np.ndarray = field(repr=False)     # (B, P) bootstrap parameters, internal form
    onset: float | None = None                  # saturating: x where y crosses the threshold
    onset_ci: tuple[float, float] | None = None
    threshold: float | None = None
    at_bound: list[str] = field(default_factory=list)  # shape parameters the optimizer pushed to a limit
    group: dict[str, Any] = field(default_factory=dict)
    x_key: str = ""
    y_key: str = ""

    def predict(self, x) -> np.ndarray:
        return _MODELS[self.form](_internal(self.form, self.params), np.asarray(x, dtype=float))

    def band(self, x, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise bootstrap band of the fitted curve at x."""
        x = np.asarray(x, dtype=float)
        curves = np.stack([_MODELS[self.form](theta, x) for theta in self.samples])
        tail = 100 * (1 - level) / 2
        return np.percentile(curves, tail, axis=0), np.percentile(curves, 100 - tail, axis=0)


# -- the two forms, on internal parameters (well conditioned for the optimizer) ------------------
def _power(theta, x):
    """theta = (E, log A, alpha): y = E + exp(log A) * x^(-alpha)."""
    e, log_a, alpha = theta
    return e + np.exp(log_a - alpha * np.log(x))


def _saturating(theta, x):
    """theta = (log x50, beta): y = 1 / (1 + (x / x50)^beta)."""
    log_x50, beta = theta
    return 1.0 / (1.0 + np.exp(np.clip(beta * (np.log(x) - log_x50), -50, 50)))


_MODELS = {"power": _power, "saturating": _saturating}


def _public(form: str, theta) -> dict[str, float]:
    if form == "power":
        return {"E": float(theta[0]), "A": float(np.exp(theta[1])), "alpha": float(theta[2])}
    return {"x50": float(np.exp(theta[0])), "beta": float(theta[1])}


def _internal(form: str, params: dict[str, float]) -> np.ndarray:
    if form == "power":
        return np.array([params["E"], math.log(params["A"]), params["alpha"]])
    return np.array([math.log(params["x50"]), params["beta"]])


def _starts_and_bounds(form: str, x: np.ndarray, y: np.ndarray):
    log_lo, log_hi = np.log(x.min()), np.log(x.max())
    if form == "power":
        # The floor E is not bounded by min(y): with noise, observations fall below it.
        nonneg = bool((y >= 0).all())
        floor = max(float(y.min()), 0.0) if nonneg else float(y.min())
        lower = [0.0 if nonneg else -np.inf, -50.0, 0.0]
        upper = [np.inf, 50.0, 10.0]
        starts = []
        for alpha in (0.1, 0.3, 1.0, 2.0):
            for e in (0.0, 0.5 * floor, 0.9 * floor):
                span = max(float(y.max()) - e, 1e-12)
                starts.append([e, math.log(span) + alpha * log_lo, alpha])
        return starts, (lower, upper)
    lower, upper = [log_lo - 10.0, 0.01], [log_hi + 10.0, 20.0]
    starts = [[m, b] for m in (log_lo, (log_lo + log_hi) / 2, log_hi) for b in (0.5, 1.0, 3.0)]
    return starts, (lower, upper)


# The shape parameters whose limits mean "this form does not describe the data": an
# exponent alpha or a steepness beta at its bound is a step, not a scaling law.
_SHAPE = {"power": {2: "alpha"}, "saturating": {1: "beta"}}


def _at_bound(form: str, theta, bounds) -> list[str]:
    lower, upper = bounds
    return [name for i, name in _SHAPE[form].items()
            if np.isclose(theta[i], lower[i], rtol=1e-4, atol=1e-6) or np.isclose(theta[i], upper[i], rtol=1e-4)]


def _solve(form: str, x, y, starts, bounds, f_scale: float) -> np.ndarray:
    model = _MODELS[form]
    best, best_cost = None, np.inf
    for start in starts:
        start = np.clip(start, np.array(bounds[0]) + 1e-9, np.array(bounds[1]) - 1e-9)
        try:
            res = least_squares(lambda t: model(t, x) - y, start, bounds=bounds, loss="soft_l1", f_scale=f_scale)
        except (ValueError, FloatingPointError):
            continue
        if res.cost < best_cost:
            best, best_cost = res.x, res.cost
    if best is None:
        raise ValueError(f"{form} fit failed")
    return best


def fit(x, y, form: str, *, n_boot: int = 200, seed: int = 0, threshold: float = 0.5) -> Fit:
    """Fit `form` to rows (x, y), with 95% bootstrap intervals and, for `saturating`,
    the onset where y falls below `threshold`."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}")
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0)
    x, y = x[keep], y[keep]
    if len(np.unique(x)) < 3:
        raise ValueError("need at least 3 distinct x values to fit a scaling law")
    f_scale = max(float(np.std(y)) * 0.1, 1e-9)
    starts, bounds = _starts_and_bounds(form, x, y)
    theta = _solve(form, x, y, starts, bounds, f_scale)
    resid = _MODELS[form](theta, x) - y
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1 - float((resid**2).sum()) / total if total > 0 else float("nan")

    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(x), len(x))
        if len(np.unique(x[idx])) < 3:
            continue
        samples.append(_solve(form, x[idx], y[idx], [theta], bounds, f_scale))
    samples = np.array(samples)
    pub = np.array([list(_public(form, s).values()) for s in samples])
    names = list(_public(form, theta))
    ci = {n: (float(np.percentile(pub[:, i], 2.5)), float(np.percentile(pub[:, i], 97.5))) for i, n in enumerate(names)}
    result = Fit(form, _public(form, theta), ci, r2, len(x), (float(x.min()), float(x.max())), samples)
    result.at_bound = _at_bound(form, theta, bounds)
    if form == "saturating":
        crossing = lambda t: float(np.exp(t[0]) * (1 / threshold - 1) ** (1 / t[1]))  # noqa: E731
        result.threshold = threshold
        result.onset = crossing(theta)
        onsets = [crossing(s) for s in samples]
        result.onset_ci = (float(np.percentile(onsets, 2.5)), float(np.percentile(onsets, 97.5)))
    return result
