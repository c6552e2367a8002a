"""MLflow records: one experiment per study, one parent run per `vqstudy run` (reused by
`vqstudy resume`), exactly one child run per trial.

Ray's stock MLflow callback opens a new run whenever a trial (re)starts, so a retried or
resumed trial would appear twice. Here a trial finds its child run by the tag
`vqstudy.trial_id` and reopens it. Metrics go in one `log_batch` call per evaluation.
A run ends with its trial's `Outcome` in the tag `vqstudy.outcome` (outcome.py maps it to
and from MLflow's statuses). The default store is an SQLite file given by an absolute URI
(folder.py): trials chdir into their own folders, and MLflow 3 refuses ./mlruns.
"""
from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .outcome import Outcome, mlflow_status

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


def ensure_experiment(uri: str, name: str, artifact_root: Path | None) -> str:
    """Create (or find) the study's experiment in the driver, before any trial starts:
    that also creates the SQLite schema once instead of racing in every trial."""
    client = _client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = artifact_root.resolve().as_uri() if artifact_root else None
    return client.create_experiment(name, artifact_location=location)


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


def _terminate(client, run_id: str, outcome: Outcome, reason: str | None = None) -> None:
    client.set_tag(run_id, OUTCOME_TAG, outcome.value)
    if reason:
        client.set_tag(run_id, FAILURE_TAG, reason[:5000])
    client.set_terminated(run_id, status=mlflow_status(outcome))


def finish_parent(uri: str, run_id: str, ok: bool) -> None:
    """The study's parent run: FINISHED when every trial finished, FAILED otherwise."""
    _client(uri).set_terminated(run_id, status="FINISHED" if ok else "FAILED")


def reconcile_children(uri: str, experiment_id: str, outcomes: dict[str, tuple[Outcome, int | None]]) -> None:
    """Settle child runs their trial left RUNNING (worker died) or KILLED (Tune stopped it),
    from the driver's final view of each trial: trial id -> (outcome, step reached). A trial
    a scheduler stopped is tagged with the step where it stopped."""
    client = _client(uri)
    for status in ("RUNNING", "KILLED"):
        for run in client.search_runs([experiment_id], filter_string=f"attributes.status = '{status}'"):
            trial_id = run.data.tags.get(TRIAL_TAG)
            if trial_id not in outcomes:
                continue
            outcome, step = outcomes[trial_id]
            if outcome is Outcome.STOPPED_EARLY:
                client.set_tag(run.info.run_id, STOPPED_TAG, step)
            _terminate(client, run.info.run_id, outcome)


def log_params(client, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
        client.log_batch(run_id, params=items[i:i + 100])


def log_artifacts(uri: str, run_id: str, paths: list[Path], artifact_path: str | None = None) -> None:
    client = _client(uri)
    for p in paths:
        client.log_artifact(run_id, str(p), artifact_path)


_WRITER = None


def _writer():
    """The process's metric-writer thread (kept across trials: Ray reuses worker processes)."""
    global _WRITER
    if _WRITER is None:
        from concurrent.futures import ThreadPoolExecutor

        _WRITER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vqstudy-mlflow")
    return _WRITER


@dataclass
class TrialRun:
    """A trial's child run. `open()` finds the run of an earlier attempt of the same trial
    (retry after a crash, or `vqstudy resume`) and reopens it instead of making another.
    Metric writes go to one background writer thread per process, so that training does
    not wait on the store; `finish()` waits for them before closing the run. (MLflow's own
    async logging is not used: closing a run joins its queue thread, up to 1 s per trial.)"""
    client: Any
    run_id: str
    logged_step: int = 0        # highest step already in the run (reopened runs skip up to it)
    last_step: int = 0          # highest step this attempt has logged or inherited
    pending: list = field(default_factory=list)

    @classmethod
    def open(cls, uri: str, experiment_id: str, parent_run_id: str, trial_id: str, run_name: str,
             params: dict[str, Any], tags: dict[str, str]) -> "TrialRun":
        client = _client(uri)
        found = client.search_runs([experiment_id], filter_string=f"tags.`{TRIAL_TAG}` = '{trial_id}'",
                                   max_results=1)
        if found:  # a retry or a resume: the earlier attempt's verdict no longer holds
            run_id = found[0].info.run_id
            for tag in (OUTCOME_TAG, FAILURE_TAG, STOPPED_TAG):
                if tag in found[0].data.tags:
                    client.delete_tag(run_id, tag)
            client.update_run(run_id, status="RUNNING")
            history = client.get_metric_history(run_id, "step")
            logged = max((int(m.value) for m in history), default=0)
            return cls(client, run_id, logged_step=logged, last_step=logged)
        all_tags = {**tags, TRIAL_TAG: trial_id, PARENT_TAG: parent_run_id}
        run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
        log_params(client, run.info.run_id, params)
        return cls(client, run.info.run_id)

    def restored_at(self, step: int | None) -> None:
        """This attempt continues from a checkpoint written at `step`."""
        self.client.set_tag(self.run_id, RESTORED_TAG, step)

    def stop(self, step: int) -> None:
        """Tune stopped the trial before its end: KILLED, with the step it reached."""
        self.flush()
        self.client.set_tag(self.run_id, STOPPED_TAG, step)
        self.client.set_terminated(self.run_id, status="KILLED")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """All of one evaluation's metrics in one write."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))]
        self.last_step = max(step, self.last_step)
        self.pending.append(_writer().submit(self.client.log_batch, self.run_id, metrics=batch))

    def flush(self) -> None:
        """Wait for the queued writes; the first failed one raises here."""
        while self.pending:
            self.pending.pop(0).result()

    def finish(self, outcome: Outcome, reason: str | None = None) -> None:
        self.flush()
        _terminate(self.client, self.run_id, outcome, reason)
