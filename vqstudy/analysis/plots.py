"""The study's figures (PNG at least `MIN_PNG_PX` wide, and SVG): metric vs codebook size
with fitted curves and 95% bands per quantizer, panels per latent dimension; effective_dim
vs encoder capacity; the Pareto front of recon_mse vs utilization. Seeds are shown as faint
dots, their mean as the marker with its 95% confidence interval (none with one seed), so
the spread the fit has to explain stays visible. A fitted curve is drawn only over the
range it was fitted on, and the axes are set by the data, not by the bands: a band that
runs far past the data (a fit the data cannot pin down) is cut at the axis, not allowed to
squash the points into a line.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from ..catalogue import METRICS
from ..figures import new_figure
from .fits import Fit

COLORS = ["tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:gray"]
LABELS = {  # axis labels of the swept config keys; metrics label themselves (catalogue)
    "quantizer.codebook_size": "codebook size K",
    "model.encoder_width": "encoder width (channels / hidden units)",
    "model.latent_dim": "latent dimension D",
    **{name: m.label for name, m in METRICS.items()},
}


def _figure(width: float, height: float):
    return new_figure(width, height, dpi=110, layout="constrained")


MIN_PNG_PX = 1200   # PNG width: readable in a report at full width and when zoomed


def _save(fig, stem: Path) -> list[Path]:
    stem.parent.mkdir(parents=True, exist_ok=True)
    png, svg = stem.with_suffix(".png"), stem.with_suffix(".svg")
    fig.savefig(png, dpi=max(fig.dpi, math.ceil(MIN_PNG_PX / fig.get_figwidth())))
    fig.savefig(svg)
    return [png, svg]


def mean_ci(values: pd.Series) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (Student t; 0 with one value)."""
    n = values.count()
    if n < 2:
        return float(values.mean()), 0.0
    return float(values.mean()), float(stats.t.ppf(0.975, n - 1) * values.std() / math.sqrt(n))


def _limits_from_data(ax, lows, highs, log: bool) -> None:
    """y limits that hold every point and CI bar with a margin; bands past them are cut."""
    lo, hi = float(np.nanmin(lows)), float(np.nanmax(highs))
    if log:
        span = (hi / lo) ** 0.08 if lo > 0 and hi > lo else 1.5
        ax.set_ylim(lo / span, hi * span)
    else:
        pad = 0.08 * (hi - lo) if hi > lo else max(abs(hi) * 0.1, 1e-3)
        ax.set_ylim(lo - pad, hi + pad)


def color_of(names: list[str]) -> dict[str, str]:
    return {n: COLORS[i % len(COLORS)] for i, n in enumerate(sorted(names))}


def _log2_axis(ax, xs) -> None:
    ax.set_xscale("log", base=2)
    ticks = sorted(set(xs))
    ax.set_xticks(ticks, [f"$2^{{{int(round(np.log2(t)))}}}$" if t > 0 and np.log2(t).is_integer() else f"{t:g}"
                          for t in ticks])
    ax.minorticks_off()


def _seed_points(ax, df: pd.DataFrame, x_key: str, y_key: str, color: str, label: str) -> tuple[float, float]:
    """Each seed as a faint dot, the mean with its 95% CI; returns the (low, high) they span."""
    ax.scatter(df[x_key], df[y_key], s=10, color=color, alpha=0.35, linewidths=0)
    rows = [(x, *mean_ci(v)) for x, v in df.groupby(x_key)[y_key]]
    xs, means, half = (np.array(c, dtype=float) for c in zip(*rows))
    ax.errorbar(xs, means, yerr=half, fmt="o", ms=4, color=color, capsize=2, label=label)
    return min(df[y_key].min(), (means - half).min()), max(df[y_key].max(), (means + half).max())


def scaling_plot(df: pd.DataFrame, y_key: str, fits: list[Fit], stem: Path, *, x_key: str = "quantizer.codebook_size",
                 panel_key: str | None = None, title: str = "") -> list[Path]:
    """y vs K, one colour per quantizer, one panel per value of `panel_key`, fits with bands."""
    panels = sorted(df[panel_key].unique()) if panel_key else [None]
    colors = color_of(list(df["quantizer.name"].unique()))
    fig = _figure(4.2 * len(panels) + 1.6, 3.6)
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    spans: list[tuple[float, float]] = []
    for ax, panel in zip(axes, panels):
        sub = df if panel is None else df[df[panel_key] == panel]
        for q, rows in sub.groupby("quantizer.name"):
            spans.append(_seed_points(ax, rows, x_key, y_key, colors[q], q))
            for f in fits:
                if f.group.get("quantizer.name") == q and (panel is None or f.group.get(panel_key) == panel):
                    grid = np.geomspace(*f.x_range, 100)
                    lo, hi = f.band(grid)
                    ax.plot(grid, f.predict(grid), color=colors[q], lw=1.5)
                    ax.fill_between(grid, lo, hi, color=colors[q], alpha=0.15, lw=0)
        _log2_axis(ax, sub[x_key])
        ax.set_xlabel(LABELS.get(x_key, x_key))
        if panel is not None:
            ax.set_title(f"{LABELS.get(panel_key, panel_key).split(' (')[0]} = {panel}", fontsize=9)
        ax.grid(alpha=0.3, which="both")
    if y_key == "utilization":
        axes[0].set_ylim(-0.03, 1.05)          # panels share y
    else:
        log = min(lo for lo, _ in spans) > 0
        if log:
            axes[0].set_yscale("log")
        _limits_from_data(axes[0], [lo for lo, _ in spans], [hi for _, hi in spans], log)
    axes[0].set_ylabel(LABELS.get(y_key, y_key))
    handles = {label: h for ax in axes for h, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(handles.values(), handles.keys(), loc="outside right upper", fontsize=8, title_fontsize=8,
               title="quantizer\nmean ± 95% CI,\nfit and 95% band")   # outside: never over the data
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, stem)


def capacity_plot(df: pd.DataFrame, stem: Path, *, x_key: str = "model.encoder_width",
                  y_key: str = "effective_dim", panel_key: str | None = None, title: str = "") -> list[Path]:
    """A metric (effective_dim, utilization) vs encoder capacity: colour per quantizer, line
    style per encoder depth, one panel per value of `panel_key` (e.g. quantizer.warmup_steps:
    early vs deferred quantization)."""
    colors = color_of(list(df["quantizer.name"].unique()))
    depths = sorted(df["model.encoder_depth"].unique())
    styles = ["-", "--", ":", "-."]
    panels = sorted(df[panel_key].unique()) if panel_key else [None]
    fig = _figure(4.2 * len(panels) + 1.0, 3.6)
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    for ax, panel in zip(axes, panels):
        sub = df if panel is None else df[df[panel_key] == panel]
        for (q, depth), rows in sub.groupby(["quantizer.name", "model.encoder_depth"]):
            stats = rows.groupby(x_key)[y_key].agg(["mean", "std"]).reset_index()
            ax.errorbar(stats[x_key], stats["mean"], yerr=stats["std"].fillna(0), color=colors[q],
                        ls=styles[depths.index(depth) % len(styles)], marker="o", ms=4, capsize=2,
                        label=f"{q}, depth {depth}")
        _log2_axis(ax, sub[x_key])
        ax.set_xlabel(LABELS.get(x_key, x_key))
        if y_key == "effective_dim":  # the most dimensions the encoder outputs can span
            latent = sub["model.latent_dim"].max()
            ax.axhline(latent, color="gray", lw=0.8, ls=":")
            ax.text(ax.get_xlim()[0], latent, f" D = {latent}", va="bottom", fontsize=8, color="gray")
        elif y_key == "utilization":
            ax.set_ylim(-0.03, 1.05)
        if panel is not None:
            ax.set_title(f"{panel_key.split('.')[-1]} = {panel}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(LABELS.get(y_key, y_key))
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, stem)


def pareto_front(points: np.ndarray) -> np.ndarray:
    """Indices of the non-dominated rows of (recon_mse to minimize, utilization to maximize)."""
    keep = []
    for i, (r, u) in enumerate(points):
        dominated = np.any((points[:, 0] <= r) & (points[:, 1] >= u) & ((points[:, 0] < r) | (points[:, 1] > u)))
        if not dominated:
            keep.append(i)
    return np.array(sorted(keep, key=lambda i: points[i, 0]), dtype=int)


def pareto_plot(df: pd.DataFrame, stem: Path, title: str = "") -> list[Path]:
    """Every trial in (recon_mse, utilization); the non-dominated front per quantizer joined."""
    colors = color_of(list(df["quantizer.name"].unique()))
    fig = _figure(5.2, 3.8)
    ax = fig.subplots()
    for q, rows in df.groupby("quantizer.name"):
        pts = rows[["recon_mse", "utilization"]].to_numpy(dtype=float)
        ax.scatter(pts[:, 0], pts[:, 1], s=14, color=colors[q], alpha=0.5, linewidths=0)
        front = pts[pareto_front(pts)]
        ax.plot(front[:, 0], front[:, 1], color=colors[q], marker="o", ms=4, lw=1.5, label=f"{q} (Pareto front)")
    ax.set_xscale("log")
    ax.set_xlabel(LABELS["recon_mse"] + " (lower is better)")
    ax.set_ylabel("utilization (higher is better)")
    ax.set_ylim(-0.03, 1.05)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, stem)
