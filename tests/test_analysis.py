"""Analysis: fits recover known laws and their 95% intervals cover the truth; export writes
the documented columns and dtypes (SQL and client paths agree); figures and reports are
written; a missing or empty study folder is a one-line error."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vqstudy import tracking
from vqstudy.analysis import fit_curves, make_figures
from vqstudy.analysis.export import METRIC_COLUMNS, RECORD_COLUMNS, export_runs, read_runs, to_table
from vqstudy.analysis.fits import fit
from vqstudy.analysis.plots import pareto_front
from vqstudy.analysis.report import reading, write_report
from vqstudy.cli import main
from vqstudy.config import TrialConfig, all_keys
from vqstudy.folder import StudyFolder
from vqstudy.outcome import Outcome
from vqstudy.study import parse_study

KS = 2.0 ** np.arange(4, 15)          # 16 .. 16,384


def power_data(rng, E=0.05, A=3.0, alpha=0.6, noise=0.004, seeds=3):
    x = np.repeat(KS, seeds)
    return x, E + A * x ** -alpha + noise * rng.standard_normal(x.size)


def test_power_law_recovers_parameters():
    """y = E + A K^-alpha with small noise: E, A, alpha recovered; R^2 near 1."""
    x, y = power_data(np.random.default_rng(0))
    f = fit(x, y, "power", n_boot=50)
    assert f.params["alpha"] == pytest.approx(0.6, abs=0.05)
    assert f.params["E"] == pytest.approx(0.05, abs=0.005)
    assert f.params["A"] == pytest.approx(3.0, rel=0.25)
    assert f.r2 > 0.99 and f.n == x.size


def test_saturating_recovers_onset():
    """u = 1/(1 + (K/x50)^beta): x50 and beta recovered; the 50% onset is x50, inside its CI."""
    rng = np.random.default_rng(1)
    x = np.repeat(KS, 3)
    y = 1 / (1 + (x / 600.0) ** 1.3) + 0.02 * rng.standard_normal(x.size)
    f = fit(x, y, "saturating", n_boot=50, threshold=0.5)
    assert f.params["x50"] == pytest.approx(600, rel=0.15) and f.params["beta"] == pytest.approx(1.3, abs=0.2)
    assert f.onset == pytest.approx(f.params["x50"]) and f.onset_ci[0] <= 600 <= f.onset_ci[1]
    f25 = fit(x, y, "saturating", n_boot=20, threshold=0.25)
    assert f25.onset == pytest.approx(600 * 3 ** (1 / 1.3), rel=0.2)   # (1/0.25 - 1)^(1/beta)


def test_robust_loss_ignores_one_bad_seed():
    """One wild outlier barely moves the robust fit."""
    rng = np.random.default_rng(2)
    x, y = power_data(rng)
    y[5] += 1.0
    assert fit(x, y, "power", n_boot=10).params["alpha"] == pytest.approx(0.6, abs=0.07)


@pytest.mark.slow
def test_confidence_intervals_cover_the_truth():
    """Over 100 synthetic repetitions the 95% bootstrap CI covers each true parameter >= 90 times."""
    rng = np.random.default_rng(3)
    truth = {"E": 0.05, "A": 3.0, "alpha": 0.6}
    covered = dict.fromkeys(truth, 0)
    for _ in range(100):
        x, y = power_data(rng, noise=0.01)
        f = fit(x, y, "power", n_boot=100, seed=int(rng.integers(1 << 30)))
        for k, v in truth.items():
            covered[k] += f.ci[k][0] <= v <= f.ci[k][1]
    assert all(c >= 90 for c in covered.values()), covered


def test_a_step_is_not_read_as_a_power_law():
    """Flat after a drop at the smallest K: the exponent runs to its bound, and the reading says
    there is no power law instead of quoting the exponent."""
    x = np.repeat(KS[:6], 2)
    y = np.where(x < 32, 0.9, 0.85) + 0.001 * np.random.default_rng(5).standard_normal(x.size)
    f = fit(x, y, "power", n_boot=20)
    f.group, f.y_key = {"quantizer.name": "vq"}, "recon_mse"
    assert f.at_bound == ["alpha"] and "does not follow a power law" in reading(f)
    x, y = power_data(np.random.default_rng(0))
    assert fit(x, y, "power", n_boot=5).at_bound == []


def test_too_few_sizes_is_refused():
    """A law from two codebook sizes is not a law: ValueError."""
    with pytest.raises(ValueError, match="3 distinct"):
        fit([16, 16, 64, 64], [1, 1.1, 0.5, 0.4], "power")


def test_pareto_front():
    """Non-dominated points of (min recon, max utilization), sorted by recon."""
    pts = np.array([[1.0, 0.9], [0.5, 0.5], [0.6, 0.4], [2.0, 0.95], [0.4, 0.1]])
    assert pareto_front(pts).tolist() == [4, 1, 0, 3]


# -- export ----------------------------------------------------------------------------------
def fake_store(tmp_path, n=6):
    """An MLflow SQLite store holding a study as vqstudy's trainable writes it (no Ray needed)."""
    uri = StudyFolder(tmp_path).default_tracking_uri
    exp = tracking.ensure_experiment(uri, "fake", tmp_path / "mlartifacts")
    parent = tracking.start_parent(uri, exp, "fake", {tracking.STUDY_TAG: "fake"}, {})
    for i in range(n):
        cfg = TrialConfig().with_overrides([f"quantizer.codebook_size={16 * 2 ** i}", f"train.seed={i % 2}"]
                                           + (["quantizer.levels=8,4"] if i == 1 else []))
        run = tracking.TrialRun.open(uri, exp, parent, f"t{i:02d}", f"t{i}", cfg.to_flat(), {tracking.STUDY_TAG: "fake"})
        for step in (100, 200):
            run.log({"step": step, "recon_mse": 1 / (i + step), "utilization": 0.5, "dead_codes": 7,
                     "train_time_s": 2.0}, step=step)
        run.end(Outcome.DIVERGED if i == 3 else Outcome.FINISHED, reason="loss became nan at step 5" if i == 3 else None)
    return uri, exp, parent


def test_export_columns_and_dtypes(tmp_path):
    """Parquet has every config key, metric and record column with the documented types."""
    uri, exp, parent = fake_store(tmp_path)
    out = tmp_path / "results.parquet"
    export_runs(uri, exp, parent, out)
    table = pq.read_table(out)
    assert table.num_rows == 6
    assert set(all_keys()) | set(METRIC_COLUMNS) | set(RECORD_COLUMNS) == set(table.column_names)
    types = dict(zip(table.column_names, table.schema.types))
    assert types["quantizer.codebook_size"] == pa.int64() and types["train.lr"] == pa.float64()
    assert types["quantizer.rotation_trick"] == pa.bool_() and types["quantizer.name"] == pa.string()
    assert types["data.num_train"] == pa.int64() and types["dead_codes"] == pa.int64()
    df = table.to_pandas()
    assert df["quantizer.codebook_size"].tolist() == [16, 32, 64, 128, 256, 512]
    assert df["data.num_train"].isna().all()                         # null in the config stays null
    assert types["quantizer.levels"] == pa.list_(pa.int64())
    assert [None if v is None else list(v) for v in df["quantizer.levels"]] == [None, [8, 4], None, None, None, None]
    assert df["steps"].tolist() == [200] * 6 and df["recon_mse"][0] == pytest.approx(1 / 200)
    assert df["status"].tolist() == ["finished"] * 3 + ["diverged"] + ["finished"] * 2
    assert df["study"].unique().tolist() == ["fake"] and df["runtime_s"].notna().all()


def test_sql_and_client_paths_agree(tmp_path, monkeypatch):
    """The direct SQLite read and MLflow's search_runs give the same table."""
    import vqstudy.analysis.export as ex

    uri, exp, parent = fake_store(tmp_path, n=4)
    fast = to_table(read_runs(uri, exp, parent))
    slow = to_table(ex._runs_from_client(uri, exp, parent))
    assert fast.equals(slow)


# -- figures, report, errors -----------------------------------------------------------------------
def synthetic_results(rng) -> pd.DataFrame:
    rows = []
    for q, collapse in (("vq", 64.0), ("simvq", 1e7)):
        for depth in (0, 2):
            for k in KS[:8]:
                for seed in range(2):
                    rows.append({"quantizer.name": q, "quantizer.codebook_size": int(k), "train.seed": seed,
                                 "model.encoder_width": 64, "model.encoder_depth": depth, "model.latent_dim": 8,
                                 "utilization": float(np.clip(1 / (1 + k / collapse) + 0.02 * rng.standard_normal(), 0, 1)),
                                 "recon_mse": float(0.1 + k ** -0.5 + 0.002 * rng.standard_normal()),
                                 "effective_dim": float(4 + depth), "status": "finished"})
    return pd.DataFrame(rows)


def test_figures_and_report_are_written(tmp_path):
    """Fits per (quantizer, depth); PNG and SVG figures non-empty; report.md/html embed them."""
    df = synthetic_results(np.random.default_rng(4))
    fits = fit_curves(df, n_boot=20)
    assert {(f.group["quantizer.name"], f.group["model.encoder_depth"], f.y_key) for f in fits} == {
        (q, d, m) for q in ("vq", "simvq") for d in (0, 2) for m in ("utilization", "recon_mse")}
    study = parse_study({"name": "synthetic", "sweep": {"metric": ["recon_mse", "utilization"], "mode": ["min", "max"],
                                                       "search": {"algorithm": "optuna", "train.lr": {"uniform": [0.1, 1]}}}})
    figures = make_figures(df, fits, study, tmp_path)
    names = {p.name for p in figures}
    assert {"utilization_vs_K.png", "utilization_vs_K.svg", "recon_mse_vs_K.png", "pareto_recon_vs_utilization.svg"} <= names
    for p in figures:
        head = p.read_bytes()[:8]
        assert p.stat().st_size > 2000 and (head.startswith(b"\x89PNG") or b"<?xml" in head)
        if p.suffix == ".png":   # width from the PNG header (IHDR), big-endian at bytes 16-20
            assert int.from_bytes(p.read_bytes()[16:20], "big") >= 1200, p.name
    md, html = write_report(tmp_path, "t", "summary", fits, figures)
    assert "| group | metric |" in md.read_text() and "![utilization_vs_K]" in md.read_text()
    assert html.read_text().count("data:image/png;base64,") == len([p for p in figures if p.suffix == ".png"])
    vq_util = next(f for f in fits if f.group["quantizer.name"] == "vq" and f.y_key == "utilization")
    assert "falls below 50% at K" in reading(vq_util)
    simvq_util = next(f for f in fits if f.group["quantizer.name"] == "simvq" and f.y_key == "utilization")
    assert "stays above 50%" in reading(simvq_util)


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "no such study folder"),
    (lambda p: p.mkdir(), "not a study folder"),
], ids=["missing", "empty"])
def test_missing_or_empty_folder_is_one_line(tmp_path, capsys, make, message):
    """analyze / export on a missing or empty folder: exit 2, one line naming the folder."""
    folder = tmp_path / "study"
    make(folder)
    for verb in ("analyze", "export"):
        assert main([verb, str(folder)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err and str(folder) in err


def test_study_without_finished_trials(tmp_path, capsys):
    """A study folder whose trials all failed: analyze says so in one line, exit 2."""
    uri, exp, parent = fake_store(tmp_path, n=0)
    (tmp_path / "vqstudy.json").write_text(json.dumps({"tracking_uri": uri, "experiment_id": exp,
                                                        "parent_run_id": parent, "study_path": None}))
    (tmp_path / "study.yaml").write_text("name: fake\n")
    assert main(["analyze", str(tmp_path)]) == 2
    assert "no finished trials to analyze (0 trials recorded)" in capsys.readouterr().err


def test_axes_follow_the_data_not_a_runaway_band(tmp_path, monkeypatch):
    """A flat metric with one seed gets a power-law band that runs far past the data (as vq's
    recon_mse once did in the demo's report); the y axis is set by the points and their CIs,
    so the band is cut at the axis."""
    import vqstudy.analysis.plots as plots

    flat = {16: 0.80, 64: 0.86, 256: 0.79, 1024: 0.85}     # no trend, one seed: the band reaches ~7e4
    df = pd.DataFrame([{"quantizer.name": "vq", "quantizer.codebook_size": k, "train.seed": 0, "recon_mse": v}
                       for k, v in flat.items()])
    fits = [fit(df["quantizer.codebook_size"], df["recon_mse"], "power", n_boot=200)]
    fits[0].group, fits[0].y_key = {"quantizer.name": "vq"}, "recon_mse"
    band_lo, band_hi = fits[0].band(np.geomspace(16, 1024, 100))
    limits = []
    real_save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, stem: limits.append(fig.axes[0].get_ylim()) or real_save(fig, stem))
    plots.scaling_plot(df, "recon_mse", fits, tmp_path / "flat")
    lo, hi = limits[0]
    assert band_hi.max() > hi or band_lo.min() < lo              # the band does run past the axis
    assert df["recon_mse"].min() / 1.2 < lo < df["recon_mse"].min() and df["recon_mse"].max() < hi < df["recon_mse"].max() * 1.2
