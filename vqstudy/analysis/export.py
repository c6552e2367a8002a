"""Export a study's trials from MLflow to one tidy table (pyarrow -> Parquet).

One row per trial: the flattened config under its dotted keys (typed as the config types
them), the final metrics (every entry of the metrics catalogue, typed as it says), and
`study`, `trial_id`, `status` (the trial's Outcome: finished, stopped_early, diverged,
failed, not_finished), `failure_reason` (why it failed or diverged), `stopped_early_at_step`,
`mlflow_run_id`, `runtime_s`, `steps` (the last step reached).

MLflow is the record (it also holds trials of a remote study), but its `search_runs`
builds a Python object per run, param, metric and tag. For an SQLite store the table is
read with four SQL queries instead (10,000 runs in about a second, see
benchmarks/export_bench.py); a tracking server goes through the client, page by page.
"""
from __future__ import annotations

import sqlite3
from collections import defaultdict
from pathlib import Path
from typing import Any

import pyarrow as pa

from ..catalogue import METRICS
from ..config import all_keys, coerce, key_type
from ..errors import ConfigError
from ..outcome import from_mlflow
from ..tracking import FAILURE_TAG, OUTCOME_TAG, PARENT_TAG, STOPPED_TAG, STUDY_TAG, TRIAL_TAG, child_runs

METRIC_COLUMNS = {name: pa.type_for_alias(m.dtype) for name, m in METRICS.items()}
RECORD_COLUMNS = {
    "study": pa.string(), "trial_id": pa.string(), "status": pa.string(), "failure_reason": pa.string(),
    "stopped_early_at_step": pa.int64(), "mlflow_run_id": pa.string(), "runtime_s": pa.float64(), "steps": pa.int64(),
}
_ARROW = {int: pa.int64(), float: pa.float64(), bool: pa.bool_(), str: pa.string(),
          tuple[int, ...]: pa.list_(pa.int64())}


def config_columns() -> dict[str, pa.DataType]:
    return {k: _ARROW[key_type(k)] for k in all_keys()}


def schema() -> pa.Schema:
    """The results table's columns and types (documented in the README)."""
    return pa.schema({**RECORD_COLUMNS, **config_columns(), **METRIC_COLUMNS})


# -- reading runs ---------------------------------------------------------------------------
def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):])


def _runs_from_sqlite(path: Path, experiment_id: str, parent_run_id: str | None) -> list[dict[str, Any]]:
    """Child runs with their params, latest metrics and tags: four queries, pivoted here."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        where = "r.experiment_id = ? AND r.lifecycle_stage = 'active'"
        args: list[Any] = [int(experiment_id)]
        parent = "SELECT run_uuid FROM tags WHERE key = ? AND value = ?" if parent_run_id else \
            "SELECT run_uuid FROM tags WHERE key = ?"
        parent_args = [PARENT_TAG, parent_run_id] if parent_run_id else [PARENT_TAG]
        runs = {row[0]: {"run_id": row[0], "status": row[1], "start": row[2], "end": row[3],
                         "params": {}, "metrics": {}, "tags": {}}
                for row in con.execute(f"SELECT r.run_uuid, r.status, r.start_time, r.end_time FROM runs r "
                                       f"WHERE {where} AND r.run_uuid IN ({parent})", args + parent_args)}
        ids = f"SELECT r.run_uuid FROM runs r WHERE {where} AND r.run_uuid IN ({parent})"
        for table, field in (("params", "params"), ("tags", "tags")):
            for run_id, key, value in con.execute(f"SELECT run_uuid, key, value FROM {table} WHERE run_uuid IN ({ids})",
                                                  args + parent_args):
                runs[run_id][field][key] = value
        for run_id, key, value, is_nan in con.execute(
                f"SELECT run_uuid, key, value, is_nan FROM latest_metrics WHERE run_uuid IN ({ids})", args + parent_args):
            runs[run_id]["metrics"][key] = float("nan") if is_nan else value
    finally:
        con.close()
    return list(runs.values())


def _runs_from_client(uri: str, experiment_id: str, parent_run_id: str | None) -> list[dict[str, Any]]:
    return [{"run_id": r.info.run_id, "status": r.info.status, "start": r.info.start_time, "end": r.info.end_time,
             "params": r.data.params, "metrics": r.data.metrics, "tags": r.data.tags}
            for r in child_runs(uri, experiment_id, parent_run_id)]


def read_runs(uri: str, experiment_id: str, parent_run_id: str | None = None) -> list[dict[str, Any]]:
    path = _sqlite_path(uri)
    if path is not None:
        if not path.exists():
            raise ConfigError(f"{path}: no MLflow store there")
        return _runs_from_sqlite(path, experiment_id, parent_run_id)
    return _runs_from_client(uri, experiment_id, parent_run_id)


# -- the table ----------------------------------------------------------------------------------
def _config_value(key: str, raw: str | None) -> Any:
    if raw is None:
        return None
    try:
        return coerce(key, raw)
    except ConfigError:  # a param written by another version of vqstudy: keep the row, drop the value
        return None


def _runtime_s(run: dict[str, Any]) -> float | None:
    """Time the trial spent running, over all its attempts: its training time (carried across
    restarts in its checkpoints) plus reporting and figures; not the hours a killed driver or
    a lost node kept it waiting, which the run's start-to-end time includes."""
    metrics = run["metrics"]
    if "train_time_s" in metrics:
        return sum(metrics.get(k, 0.0) for k in ("train_time_s", "reporting_time_s", "artifacts_time_s"))
    return (run["end"] - run["start"]) / 1000 if run["end"] and run["start"] else None


def to_table(runs: list[dict[str, Any]]) -> pa.Table:
    """Runs as read above -> the typed results table, one row per trial, sorted by trial id."""
    columns: dict[str, list] = defaultdict(list)
    config_keys, metric_keys = list(config_columns()), list(METRIC_COLUMNS)
    for run in sorted(runs, key=lambda r: (r["tags"].get(TRIAL_TAG) or "", r["run_id"])):
        tags, metrics, params = run["tags"], run["metrics"], run["params"]
        stopped = tags.get(STOPPED_TAG)
        columns["study"].append(tags.get(STUDY_TAG))
        columns["trial_id"].append(tags.get(TRIAL_TAG))
        columns["status"].append(from_mlflow(run["status"], tags.get(OUTCOME_TAG)).value)
        columns["failure_reason"].append(tags.get(FAILURE_TAG))
        columns["stopped_early_at_step"].append(int(stopped) if stopped else None)
        columns["mlflow_run_id"].append(run["run_id"])
        columns["runtime_s"].append(_runtime_s(run))
        columns["steps"].append(int(metrics["step"]) if "step" in metrics else None)
        for key in config_keys:
            columns[key].append(_config_value(key, params.get(key)))
        for key in metric_keys:
            value = metrics.get(key)
            columns[key].append(None if value is None else
                                (int(value) if METRIC_COLUMNS[key] == pa.int64() else float(value)))
    sch = schema()
    return pa.table({name: pa.array(columns[name], type=sch.field(name).type) for name in sch.names}, schema=sch)


def export_runs(uri: str, experiment_id: str, parent_run_id: str | None, output: Path | None) -> pa.Table:
    """Read, tabulate and (if `output`) write Parquet atomically."""
    import pyarrow.parquet as pq

    table = to_table(read_runs(uri, experiment_id, parent_run_id))
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = output.with_suffix(output.suffix + ".tmp")
        pq.write_table(table, tmp)
        tmp.replace(output)
    return table
