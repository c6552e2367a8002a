"""MLflow records: one experiment per study, one parent run per `vqstudy run` (reused by
`vqstudy resume`), exactly one child run per trial.

Only the driver writes here (recorder.py, from the study's ledger): trials report to Tune,
so a store the worker nodes cannot reach -- the default SQLite file in the study folder --
works on any cluster. Ray's stock MLflow callback opens a new run whenever a trial
(re)starts, so a retried or resumed trial would appear twice; here a trial's child run
carries the tag `vqstudy.trial_id`, by which the driver finds it once and reopens it.
Metrics go in one `log_batch` call per evaluation. A run ends with its trial's `Outcome` in the tag `vqstudy.outcome` (outcome.py
maps it to and from MLflow's statuses).
"""
from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .outcome import Outcome, from_mlflow, mlflow_status

TRIAL_TAG = "vqstudy.trial_id"
STUDY_TAG = "vqstudy.study"
OUTCOME_TAG = "vqstudy.outcome"             # the trial's Outcome, set when its run ends
FAILURE_TAG = "vqstudy.failure"             # why it failed or diverged, in words
RESTORED_TAG = "vqstudy.restored_at_step"   # set when a trial continued from a checkpoint
STOPPED_TAG = "vqstudy.stopped_early_at_step"  # set when the scheduler (ASHA) stopped a trial
PARENT_TAG = "mlflow.parentRunId"


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def git_commit(folder: Path) -> str | None:
    """The commit of the git checkout holding `folder`, if any (with '+dirty' for local edits)."""
    def git(*args):
        return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10)
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        dirty = git("status", "--porcelain", "--", ".").stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def base_tags(study_name: str, study_path: Path | None) -> dict[str, str]:
    tags = {STUDY_TAG: study_name, "vqstudy.version": __version__}
    commit = git_commit(study_path.parent) if study_path else None
    if commit:
        tags["vqstudy.git_commit"] = commit
    return tags


NOTE_TAG = "mlflow.note.content"            # the description the UI shows on a run or experiment
# What the UI should take the experiment for: model training (its run table and charts), not
# GenAI (traces and token usage, MLflow 3's default view).
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
UI_QUERY = "?workflowType=machine_learning"  # the same, per browser: every link vqstudy gives carries it


def ensure_experiment(uri: str, name: str, artifact_root: Path | None, description: str = "") -> str:
    """Create (or find) the study's experiment in the driver, before any trial starts:
    that also creates the SQLite schema once instead of racing in every trial."""
    client = _client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = artifact_root.resolve().as_uri() if artifact_root else None
        experiment_id = client.create_experiment(name, artifact_location=location)
    else:
        experiment_id = exp.experiment_id
    for key, value in {**EXPERIMENT_TAGS, **({NOTE_TAG: description} if description else {})}.items():
        client.set_experiment_tag(experiment_id, key, value)
    return experiment_id


def ui_link(experiment_id: str, base: str = "http://127.0.0.1:5000") -> str:
    """The experiment's run list in the MLflow UI, in its model-training view."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs{UI_QUERY}"


def view_hint(uri: str, experiment_id: str) -> str:
    """How to look at a study's runs: its server's page, or the command that serves a local store."""
    if uri.startswith(("http://", "https://")):
        return f"runs at {ui_link(experiment_id, uri)}"
    return f"see the runs: mlflow ui --backend-store-uri {uri}, then open {ui_link(experiment_id)}"


def relocate_artifacts(db: Path, old: Path, new: Path) -> None:
    """Point a moved SQLite store's artifact locations (experiments and runs; MLflow keeps
    them as absolute file URIs) from `old` to `new`: without this, a moved folder's artifacts
    are not found and a copied one would write into the original's folder."""
    import sqlite3

    before, after = old.as_uri(), new.resolve().as_uri()
    conn = sqlite3.connect(db)
    try:
        with conn:   # one transaction
            for table, column in (("experiments", "artifact_location"), ("runs", "artifact_uri")):
                conn.execute(f"UPDATE {table} SET {column} = ? || substr({column}, ?) WHERE {column} = ? "
                             f"OR {column} LIKE ? ESCAPE '\\'",
                             (after, len(before) + 1, before, _like_prefix(before + "/")))
    finally:
        conn.close()


def _like_prefix(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def start_parent(uri: str, experiment_id: str, run_name: str, tags: dict[str, str], params: dict[str, Any],
                 run_id: str | None = None) -> str:
    """The study's parent run: created once, reopened (RUNNING again) by a resume."""
    client = _client(uri)
    if run_id:
        client.update_run(run_id, status="RUNNING")
        return run_id
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    log_params(client, run.info.run_id, params)
    return run.info.run_id


def _ms(at: float | None) -> int:
    """Epoch seconds (None: now) as MLflow's epoch milliseconds."""
    return int((time.time() if at is None else at) * 1000)


def _terminate(client, run_id: str, outcome: Outcome, reason: str | None = None, at: float | None = None) -> None:
    client.set_tag(run_id, OUTCOME_TAG, outcome.value)
    if reason:
        client.set_tag(run_id, FAILURE_TAG, reason[:5000])
    client.set_terminated(run_id, status=mlflow_status(outcome), end_time=_ms(at))


def close_study(uri: str, experiment_id: str, parent_run_id: str, status: str) -> None:
    """End the parent run with `status` (FINISHED: every trial finished; KILLED: interrupted;
    FAILED: otherwise) and every child run still RUNNING as KILLED (not finished; a resume
    reopens it), so that a driver that exits leaves no run RUNNING."""
    client = _client(uri)
    for run in child_runs(uri, experiment_id, parent_run_id):
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status="KILLED")
    client.set_terminated(parent_run_id, status=status)


def child_runs(uri: str, experiment_id: str, parent_run_id: str | None):
    """The child runs of a parent (or of every parent), page by page: any MLflow store."""
    query = f"tags.`{PARENT_TAG}` = '{parent_run_id}'" if parent_run_id else f"tags.`{PARENT_TAG}` != ''"
    client, token = _client(uri), None
    while True:
        page = client.search_runs([experiment_id], filter_string=query, max_results=5000, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def children(uri: str, experiment_id: str, parent_run_id: str) -> dict[str, list[tuple[str, int | None]]]:
    """Trial id -> [(outcome, last step)] of each of its child runs (more than one is a duplicate)."""
    out: dict[str, list] = {}
    for run in child_runs(uri, experiment_id, parent_run_id):
        step = run.data.metrics.get("step")
        outcome = from_mlflow(run.info.status, run.data.tags.get(OUTCOME_TAG)).value
        out.setdefault(run.data.tags.get(TRIAL_TAG), []).append((outcome, None if step is None else int(step)))
    return out


def child_run_ids(uri: str, experiment_id: str, parent_run_id: str) -> dict[str, str]:
    """Trial id -> its child run's id."""
    return {run.data.tags.get(TRIAL_TAG): run.info.run_id for run in child_runs(uri, experiment_id, parent_run_id)}


def closed_children(uri: str, experiment_id: str, parent_run_id: str) -> dict[str, tuple[str, int | None]]:
    """Trial id -> (outcome, last step) of the child runs that are closed."""
    return {trial: runs[0] for trial, runs in children(uri, experiment_id, parent_run_id).items()
            if len(runs) == 1 and runs[0][0] != Outcome.NOT_FINISHED.value}


def log_params(client, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
        client.log_batch(run_id, params=items[i:i + 100])


def log_artifacts(uri: str, run_id: str, paths: list[Path], artifact_path: str | None = None) -> None:
    client = _client(uri)
    for p in paths:
        client.log_artifact(run_id, str(p), artifact_path)


@dataclass
class TrialRun:
    """A trial's child run. `open()` finds the run of an earlier attempt of the same trial
    (retry after a crash, or `vqstudy resume`) and reopens it instead of making another,
    remembering the last step it holds so that no step is logged twice."""
    client: Any
    run_id: str
    logged_step: int = 0        # highest step already in the run

    @classmethod
    def open(cls, uri: str, experiment_id: str, parent_run_id: str, trial_id: str, run_name: str,
             params: dict[str, Any], tags: dict[str, str], run_id: str | None = None,
             at: float | None = None) -> "TrialRun":
        """Reopen `run_id` (the trial's run from an earlier attempt), else create the run.
        The caller knows which (`child_run_ids` once per driver): a search per trial would
        scan an experiment that grows with the study."""
        client = _client(uri)
        if run_id:  # a retry or a resume: the earlier attempt's verdict no longer holds
            found = client.get_run(run_id)
            for tag in (OUTCOME_TAG, FAILURE_TAG, STOPPED_TAG):
                if tag in found.data.tags:
                    client.delete_tag(run_id, tag)
            client.update_run(run_id, status="RUNNING")
            history = client.get_metric_history(run_id, "step")
            return cls(client, run_id, logged_step=max((int(m.value) for m in history), default=0))
        all_tags = {**tags, TRIAL_TAG: trial_id, PARENT_TAG: parent_run_id}
        run = client.create_run(experiment_id, start_time=_ms(at), run_name=run_name, tags=all_tags)
        log_params(client, run.info.run_id, params)
        return cls(client, run.info.run_id)

    def restored_at(self, step: int | None) -> None:
        """This attempt continues from a checkpoint written at `step`."""
        self.client.set_tag(self.run_id, RESTORED_TAG, step)

    def log(self, metrics: dict[str, float], step: int, at: float | None = None) -> None:
        """All of one evaluation's metrics in one write, stamped `at` (when the driver saw them)."""
        from mlflow.entities import Metric

        when = _ms(at)
        batch = [Metric(k, float(v), when, step) for k, v in metrics.items() if isinstance(v, (int, float))]
        self.client.log_batch(self.run_id, metrics=batch)
        self.logged_step = max(step, self.logged_step)

    def end(self, outcome: Outcome, reason: str | None = None, stopped_at: int | None = None,
            at: float | None = None) -> None:
        """Close the run with the trial's outcome (and the step a scheduler stopped it at)."""
        if stopped_at is not None:
            self.client.set_tag(self.run_id, STOPPED_TAG, stopped_at)
        _terminate(self.client, self.run_id, outcome, reason, at)
