"""Turn a finished study into curves: export (Parquet) -> fits -> plots -> report, every
artifact also logged to the study's MLflow parent run.

Which curves: metric vs codebook size K whenever K is swept (utilization with the
saturating form and its collapse onset, recon_mse with the power law), fitted per group
(quantizer, and any other swept key with few values); panels per latent dimension;
effective_dim vs encoder width when the encoder is swept; the Pareto front of recon_mse
vs utilization for multi-objective studies. Only trials that ran to the end enter fits
and figures: failed, diverged and early-stopped (ASHA) trials are exported but not fitted.
"""
from __future__ import annotations

import csv
import itertools
from pathlib import Path

import pandas as pd

from ..config import all_keys
from ..errors import ConfigError
from ..folder import Records, StudyFolder
from ..outcome import Outcome
from ..study import Study
from .export import export_runs
from .fits import Fit, fit
from .plots import capacity_plot, pareto_plot, scaling_plot
from .report import fit_rows, write_report

K = "quantizer.codebook_size"
CURVES = {"utilization": "saturating", "recon_mse": "power"}   # metric -> fitted form
MAX_GROUP_VALUES = 12   # a swept key with more values (a searched lr) is not a grouping key


def export_study(out_dir: Path, output: Path | None = None, records: Records | None = None):
    """Export a study folder's trials to Parquet (default DIR/results.parquet)."""
    folder = StudyFolder(out_dir)
    records = records or folder.load()[1]
    return export_runs(records.tracking_uri, records.experiment_id, records.parent_run_id,
                       output or folder.results_file)


def swept_keys(df: pd.DataFrame) -> list[str]:
    return [k for k in all_keys() if k in df and df[k].nunique(dropna=True) > 1]


def group_keys(df: pd.DataFrame) -> list[str]:
    """Keys a curve is split by: the quantizer always, other swept keys with few values."""
    keys = [k for k in swept_keys(df) if k not in (K, "train.seed") and df[k].nunique() <= MAX_GROUP_VALUES]
    return ["quantizer.name"] + [k for k in keys if k != "quantizer.name"]


def fit_curves(df: pd.DataFrame, *, threshold: float = 0.5, n_boot: int = 200) -> list[Fit]:
    """One fit per group and metric, when K takes at least 3 values in the group."""
    fits = []
    keys = group_keys(df)
    for values, rows in df.groupby(keys):
        group = dict(zip(keys, values if isinstance(values, tuple) else (values,)))
        if rows[K].nunique() < 3:
            continue
        for metric, form in CURVES.items():
            try:
                f = fit(rows[K], rows[metric], form, n_boot=n_boot, threshold=threshold)
            except ValueError:
                continue
            f.group, f.x_key, f.y_key = group, K, metric
            fits.append(f)
    return fits


def make_figures(df: pd.DataFrame, fits: list[Fit], study: Study, out: Path) -> list[Path]:
    paths: list[Path] = []
    keys = group_keys(df)
    if df[K].nunique() >= 2:
        panel = "model.latent_dim" if "model.latent_dim" in keys else next(iter(keys[1:]), None)
        rest = [k for k in keys[1:] if k != panel]
        for values in itertools.product(*(sorted(df[k].unique()) for k in rest)):
            sub = df
            for k, v in zip(rest, values):
                sub = sub[sub[k] == v]
            if sub.empty:
                continue
            suffix = "".join(f"_{k.split('.')[-1]}{v}" for k, v in zip(rest, values))
            note = ", ".join(f"{k.split('.')[-1]} = {v}" for k, v in zip(rest, values))
            chosen = [f for f in fits if all(f.group.get(k) == v for k, v in zip(rest, values))]
            for metric in CURVES:
                paths += scaling_plot(sub, metric, [f for f in chosen if f.y_key == metric],
                                      out / f"{metric}_vs_K{suffix}", panel_key=panel,
                                      title=f"{study.name}: {metric} vs K{' (' + note + ')' if note else ''}")
    if "model.encoder_width" in swept_keys(df):
        others = [k for k in keys[1:] if k not in ("model.encoder_width", "model.encoder_depth")]
        panel = next(iter(others), None)
        paths += capacity_plot(df, out / "effective_dim_vs_encoder_width", panel_key=panel,
                               title=f"{study.name}: embedding collapse vs encoder capacity")
        if df[K].nunique() < 2:  # with K swept, utilization is already plotted against K
            paths += capacity_plot(df, out / "utilization_vs_encoder_width", y_key="utilization", panel_key=panel,
                                   title=f"{study.name}: codes in use vs encoder capacity")
    if study.multi_objective or {"recon_mse", "utilization"} <= set(study.sweep.metric):
        paths += pareto_plot(df, out / "pareto_recon_vs_utilization", title=f"{study.name}: trade-off")
    return paths


def _summary(study: Study, df: pd.DataFrame, used: pd.DataFrame) -> str:
    counts = df["status"].value_counts()
    ended = ", ".join(f"{counts[o.value]} {o.value.replace('_', ' ')}" for o in Outcome if o.value in counts)
    swept = ", ".join(k for k in swept_keys(df) if k != "train.seed") or "nothing"
    return (f"{study.description or study.name}. {len(df)} trials: {ended}. Swept: {swept}; "
            f"{df['train.seed'].nunique()} seed(s) per point. "
            f"{len(used)} trials that ran to the end enter the fits and figures.")


def write_fit_table(fits: list[Fit], path: Path) -> Path:
    rows = fit_rows(fits)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["group"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def analyze(out_dir: Path, *, threshold: float = 0.5, n_boot: int = 200) -> list[Path]:
    """Export + fits + plots + report for a study folder; returns the files written."""
    from .. import tracking

    folder = StudyFolder(out_dir)
    study, records = folder.load()
    folder.relocate(records)   # its report goes to MLflow: into this folder's store
    df = export_study(out_dir, records=records).to_pandas()
    used = df[df["status"] == Outcome.FINISHED.value]
    if used.empty:
        raise ConfigError(f"{out_dir}: no finished trials to analyze ({len(df)} trials recorded)")
    out = folder.analysis_dir
    out.mkdir(exist_ok=True)
    fits = fit_curves(used, threshold=threshold, n_boot=n_boot)
    figures = make_figures(used, fits, study, out)
    written = [folder.results_file, write_fit_table(fits, out / "fits.csv"), *figures]
    written += write_report(out, f"vqstudy report: {study.name}", _summary(study, df, used), fits, figures)
    tracking.log_artifacts(records.tracking_uri, records.parent_run_id, written, artifact_path=out.name)
    return written
