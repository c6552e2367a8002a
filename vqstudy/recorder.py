"""The driver's record keeping: Tune's events -> the ledger -> MLflow.

Trials never talk to the tracking store: they report to Tune, and on the driver the
`Recorder` callback hands each event to the `Committer`, which appends the events to the
study's ledger (ledger.py) each time Tune has saved its state, commits both (snapshot.py),
and then queues them for MLflow on one writer thread, so the driver's loop never waits on
the store. This is what makes the default SQLite store work on a cluster whose nodes do not
share the driver's disk, and what keeps MLflow exact: `project()` replays the ledger into
MLflow idempotently (steps already logged are skipped, runs already closed with the same
outcome are left alone), at the start of a resume and at the end of every run, so a driver
killed between a commit and its MLflow writes loses nothing. `audit()` then checks Ray's
committed statuses against the ledger, and the ledger against MLflow: exactly one child run
per ended trial, with its final step and outcome.
"""
from __future__ import annotations

import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from . import snapshot, tracking
from .catalogue import METRICS
from .ledger import Ledger, TrialRecord, replay
from .outcome import Outcome, from_ray
from .progress import failure_reason
from .study import Study
from .tables import trial_label
from .trainable import FIGURES_DIR, unpack


class Projector:
    """Writes ledger records into MLflow, idempotently; one thread calls it (the writer)."""

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, base: dict, tags: dict,
                 root: Path, figures_dir: Path):
        self.uri, self.experiment_id, self.parent = uri, experiment_id, parent_run_id
        self.base, self.tags, self.root, self.figures_dir = base, tags, root, figures_dir
        self.runs: dict[str, tracking.TrialRun] = {}
        self.run_ids: dict[str, str] | None = None   # trial id -> child run id, read once

    # `at`: when the driver saw the event (the ledger's time), so that a run's start, end and
    # metric times in MLflow are the trial's own, not those of the batched write.
    def started(self, trial_id: str, name: str, config: dict, at: float | None = None) -> None:
        if self.run_ids is None:
            self.run_ids = tracking.child_run_ids(self.uri, self.experiment_id, self.parent)
        run = tracking.TrialRun.open(self.uri, self.experiment_id, self.parent, trial_id, name,
                                     {**self.base, **config}, self.tags, self.run_ids.get(trial_id), at)
        self.runs[trial_id], self.run_ids[trial_id] = run, run.run_id

    def result(self, trial_id: str, metrics: dict, at: float | None = None) -> None:
        run = self.runs[trial_id]
        if metrics["step"] > run.logged_step:   # a retry or a resume may redo steps MLflow already holds
            run.log(metrics, metrics["step"], at)

    def restored(self, trial_id: str, step: int, at: float | None = None) -> None:
        self.runs[trial_id].restored_at(step)

    def figures(self, trial_id: str, paths: list[str], at: float | None = None) -> None:
        tracking.log_artifacts(self.uri, self.runs[trial_id].run_id, [self.root / p for p in paths])

    def ended(self, trial_id: str, outcome: str, reason: str | None, stopped_at: int | None,
              at: float | None = None) -> None:
        self.runs.pop(trial_id).end(Outcome(outcome), reason, stopped_at, at)   # a resume reopens it

    def replay(self, record: TrialRecord, closed: dict[str, tuple[str, int]]) -> None:
        """Bring one trial's run up to what the ledger says (skipped when MLflow already has it all)."""
        if record.outcome and closed.get(record.trial_id) == (record.outcome, record.last_step):
            return
        self.started(record.trial_id, record.name, record.config, record.started_at)
        for metrics, at in zip(record.results, record.result_times):
            self.result(record.trial_id, metrics, at)
        if record.restored_at is not None:
            self.restored(record.trial_id, record.restored_at)
        if record.outcome:
            if record.figures:
                self.figures(record.trial_id, record.figures)
            self.ended(record.trial_id, record.outcome, record.reason, record.stopped_at, record.ended_at)


def _metrics(result: dict) -> dict[str, Any]:
    """The catalogue's metrics and the step from a Tune result (Tune adds its own keys)."""
    return {k: result[k] for k in ("step", *METRICS) if k in result}


_LIVE: list = [None]   # the Recorder of the study this driver process is running


def _live():
    """What a pickled Recorder becomes when Tune restores its callbacks (tuner.pkl): the live
    recorder of this driver (a driver runs one study at a time), else one that does nothing."""
    from ray.tune import Callback

    return _LIVE[0] or Callback()


class Committer:
    """Holds the driver's events until Tune has saved its experiment state, then commits them
    with it (ledger, then the state's copy: snapshot.py) and only then hands them to MLflow
    on one writer thread, so the driver's loop never waits on the store and neither the
    ledger nor MLflow ever holds a trial that the committed state does not."""

    def __init__(self, ledger: Ledger, projector: Projector, state_dir: Path):
        self.ledger, self.projector, self.state_dir = ledger, projector, state_dir
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vqstudy-mlflow")
        self.pending: list = []
        self.buffer: list[tuple[float, str, tuple]] = []
        self.staging: Path | None = None   # Tune's driver staging folder (holds its state files)
        self.lock = threading.Lock()       # Tune's loop and the GCS watch's thread may both commit
        self.last: snapshot.Commit | None = None

    def record(self, event: str, *args) -> None:
        """`event` is a method of Ledger and, if MLflow shows it, of Projector."""
        self.buffer.append((time.time(), event, args))

    def commit(self) -> None:
        with self.lock:
            self._commit()

    def _commit(self) -> None:
        if not self.buffer or self.staging is None:
            return
        batch, self.buffer = self.buffer, []
        for t, event, args in batch:
            self.ledger.write_at(t, event, *args)
        self.last = snapshot.save(self.staging, self.state_dir, self.ledger.sync(), self.last)
        for t, event, args in batch:
            if hasattr(self.projector, event):
                self.pending.append(self.writer.submit(getattr(self.projector, event), *args, at=t))
        if len(self.pending) >= 1000:   # keep only the writes not yet done
            self.pending = [f for f in self.pending if not f.done()]

    def drain(self) -> None:
        """Commit what is left (Tune's final save is in the staging folder) and wait for
        every queued MLflow write. One that failed is not raised here: the driver replays
        the whole ledger next (`project`), which writes what is missing or raises if the
        store still refuses."""
        self.commit()
        for future in self.pending:
            future.exception()
        self.pending.clear()


def make_recorder(study: Study, committer: Committer, interrupt=None, watch=None):
    """The Tune Callback for this driver (defined here: subclassing needs Ray). Tune pickles
    its callbacks with the experiment; this one pickles as a handle (`_live`), so a resumed
    experiment records through the new driver's committer."""
    from ray.tune import Callback

    class Recorder(Callback):
        def __init__(self):
            self.drain = committer.drain
            _LIVE[0] = self

        def __reduce__(self):
            return _live, ()

        def setup(self, **info):
            """Tune has put its SIGINT handler in place: route SIGTERM to it too (interrupt.py)."""
            if interrupt is not None:
                try:
                    interrupt.arm()
                except ValueError:   # not the main thread: signals stay as they are
                    pass

        def on_step_begin(self, iteration, trials, **info):
            reason = watch.check() if watch is not None and interrupt is not None else None
            if reason:
                interrupt.stop(reason)

        def get_state(self):
            """Tune calls this right after saving its experiment state in the staging folder,
            before copying it to the storage: the moment to commit. None: Tune keeps nothing of ours."""
            committer.commit()
            return None

        def on_trial_start(self, iteration, trials, trial, **info):
            committer.staging = Path(trial.storage.experiment_driver_staging_path)
            config = dict(trial.config)
            committer.record("started", trial.trial_id, trial_label(study, config) or str(trial), config)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            result = unpack(result)
            committer.record("result", trial.trial_id, _metrics(result))
            if "restored_at_step" in result:
                committer.record("restored", trial.trial_id, result["restored_at_step"])

        def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
            committer.record("checkpoint", trial.trial_id, (trial.last_result or {}).get("step"))

        def on_trial_recover(self, iteration, trials, trial, **info):
            committer.record("recovered", trial.trial_id)

        def on_trial_complete(self, iteration, trials, trial, **info):
            _completed(study, committer, trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            committer.record("ended", trial.trial_id, Outcome.FAILED.value, failure_reason(trial.get_error()), None)

    return Recorder()


def _completed(study: Study, committer: Committer, trial) -> None:
    """A trial Tune calls TERMINATED: finished (its figures copied out of its last
    checkpoint), stopped early by the scheduler, or diverged."""
    result = trial.last_result or {}
    outcome = from_ray("TERMINATED", result, study.planned_steps(trial.config))
    if outcome is Outcome.FINISHED and study.tracking.artifacts:
        paths = _copy_figures(trial, committer.projector.figures_dir / trial.trial_id, committer.projector.root)
        committer.record("figures", trial.trial_id, paths)
    stopped = result.get("step") if outcome is Outcome.STOPPED_EARLY else None
    committer.record("ended", trial.trial_id, outcome.value, result.get("failure"), stopped)


def _copy_figures(trial, out: Path, root: Path) -> list[str]:
    """The figures the trial left in its final checkpoint, copied into `out` in the study
    folder (from any storage: the checkpoint may sit on S3); returns paths relative to `root`."""
    if trial.checkpoint is None:
        return []
    with trial.checkpoint.as_directory() as d:
        found = sorted(Path(d, FIGURES_DIR).glob("*.png"))
        if found:
            out.mkdir(parents=True, exist_ok=True)
        for f in found:
            shutil.copyfile(f, out / f.name)
    return [str((out / f.name).relative_to(root)) for f in found]


def project(ledger_path: Path, projector: Projector) -> None:
    """Replay the whole ledger into MLflow: whatever a killed driver recorded but did not write."""
    closed = tracking.closed_children(projector.uri, projector.experiment_id, projector.parent)
    for record in replay(ledger_path).values():
        projector.replay(record, closed)


def audit(rows: list[dict], projector: Projector, ray_statuses: dict[str, str] | None = None) -> list[str]:
    """Problems with the record of the study's trials; [] when all is well. Every trial Ray's
    committed state calls done (TERMINATED or ERROR) must be done in the ledger and the other
    way round, and each done trial needs exactly one child run, closed with the trial's
    outcome and holding its final step."""
    children = tracking.children(projector.uri, projector.experiment_id, projector.parent)
    problems = []
    if ray_statuses is not None:
        done_in_ledger = {row["trial_id"] for row in rows if row["outcome"].done}
        done_in_ray = {t for t, status in ray_statuses.items() if status in ("TERMINATED", "ERROR")}
        problems += [f"{t}: Ray says it ended, the ledger does not" for t in sorted(done_in_ray - done_in_ledger)]
        problems += [f"{t}: the ledger says it ended, Ray does not" for t in sorted(done_in_ledger - done_in_ray)]
    for row in rows:
        if not row["outcome"].done:
            continue
        runs = children.get(row["trial_id"], [])
        if len(runs) != 1:
            problems.append(f"{row['trial_id']}: {len(runs)} child runs")
        elif runs[0][:2] != (row["outcome"].value, row.get("step")):
            problems.append(f"{row['trial_id']}: MLflow says {runs[0][0]} at step {runs[0][1]}, "
                            f"the ledger says {row['outcome'].value} at step {row.get('step')}")
    return problems
