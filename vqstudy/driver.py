"""The driver: connect to Ray, check the cluster can run the study, build the Tuner, run or
restore it, and settle the records when it ends.

    run:    refuse a used folder -> connect -> preflight -> lock the ledger -> folder + MLflow
            parent run -> Tuner.fit
    resume: read the folder -> lock the ledger, cut back to the last commit -> replay it into
            MLflow -> connect -> preflight -> the committed Ray state into the storage ->
            Tuner.restore -> fit (nothing committed yet: a fresh Tuner, same records)
    both:   commit and drain the recorder -> replay the ledger -> trial rows -> audit -> table
            -> parent closed

Joining or starting Ray is connection.py; building the Tuner is tuner.py; what a trial does
in its worker is trainable.py; what the driver records of it is recorder.py (ledger, then
MLflow); the folder's layout is folder.py; where Ray keeps its state is storage.py; the
checks before any trial are preflight.py; stop signals are interrupt.py. Ray is imported
inside functions only, so `--dry-run` and bad input stay fast.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from . import preflight, snapshot, tracking
from .connection import connect, gcs_address, root_cause
from .errors import ConfigError
from .folder import RAY_DIR, STUDY_FILE, Records, StudyFolder
from .interrupt import Interrupt
from .ledger import Ledger
from .outcome import all_ok
from .recorder import Committer, Projector, audit, make_recorder, project
from .storage import Storage, check_uri, clear, prune_checkpoints
from .study import Study
from .tables import format_table, outcome_summary, status_columns, sweep_summary
from .tuner import _trial_dirname, new_tuner, restored_tuner, set_state_period  # noqa: F401
from .watch import ClusterWatch

# `_trial_dirname` is pickled by name in the Tune trial states of studies started before
# tuner.py existed (as vqstudy.driver._trial_dirname): kept importable here so they resume.


def _preflight(study: Study, storage: Storage, tracking_uri: str, own_instance: bool) -> None:
    nodes = preflight.trial_nodes(study)
    preflight.check_memory(study, nodes)
    preflight.check_tracking(tracking_uri)
    if own_instance:
        preflight.check_data_roots(study)
    if not own_instance or not storage.is_local:   # one machine sees its own disk
        preflight.check_storage(storage, nodes)


def _projector(study: Study, folder: StudyFolder, records: Records) -> Projector:
    return Projector(records.tracking_uri, records.experiment_id, records.parent_run_id, study.base.to_flat(),
                     tracking.base_tags(study.name, study.path), folder.root, folder.figures_dir)


def _fit(tuner_for, study: Study, folder: StudyFolder, records: Records, ledger: Ledger) -> int:
    """Run the Tuner, bring MLflow up to the ledger, audit it against Ray's final view and
    print the table; 0 if every trial finished (or was stopped early by the scheduler) and
    the audit found its record, 130/143 when SIGINT/SIGTERM stopped it, 1 otherwise.
    Whatever ends it, no run is left RUNNING in MLflow."""
    projector = _projector(study, folder, records)
    interrupt = Interrupt()
    watch = ClusterWatch(study.resources.cpu, study.resources.gpu, gcs_address())
    recorder = make_recorder(study, Committer(ledger, projector, folder.state_dir), interrupt, watch)
    watch.watch_gcs(lambda reason: _abandon(reason, recorder, study, folder, records, projector))
    set_state_period(study)
    status = "FAILED"
    try:
        tuner_for(recorder).fit()
        recorder.drain()
        if interrupt.reason:
            status = "KILLED"
            return _interrupted(interrupt, study, folder, projector)
        prune_checkpoints(folder.storage(records))
        ok = _settle(study, folder, records, projector)
        status = "FINISHED" if ok else "FAILED"
        return 0 if ok else 1
    except KeyboardInterrupt:   # a second Ctrl-C: stop at once; the last commit stands
        status = "KILLED"
        sys.stderr.write(f"vqstudy: {study.name}: stopped at once — {_resume_hint(folder)}\n")
        raise
    finally:
        watch.close()
        interrupt.disarm()
        _close_study(records, status)


def _abandon(reason: str, recorder, study: Study, folder: StudyFolder, records: Records, projector: Projector):
    """The cluster's control plane is gone: commit what Tune last saved, bring MLflow up to
    the ledger, close the runs as interrupted, say so, and end the process (Ray's calls
    would block until Ray ends it, leaving the runs RUNNING)."""
    recorder.drain()
    project(folder.ledger_file, projector)
    _close_study(records, "KILLED")
    sys.stderr.write(f"vqstudy: {study.name}: {reason}: interrupted — {_resume_hint(folder)}\n")
    sys.stderr.flush()
    os._exit(1)


def _resume_hint(folder: StudyFolder) -> str:
    """The one next step every interrupted study names."""
    return f"continue with: vqstudy resume {folder.root}"


def _close_study(records: Records, status: str) -> None:
    """Close the MLflow runs however the study ended; a store that refuses now (a full disk)
    is said in one line, not raised over the error that ended the study."""
    try:
        tracking.close_study(records.tracking_uri, records.experiment_id, records.parent_run_id, status)
    except Exception as e:
        sys.stderr.write(f"vqstudy: could not close the study's MLflow runs ({root_cause(e)}); "
                         f"`vqstudy resume` closes them once the store takes writes again\n")


def _settle(study: Study, folder: StudyFolder, records: Records, projector: Projector) -> bool:
    """Replay the ledger into MLflow, print the table, audit; True if every trial finished and
    its record is exact."""
    project(folder.ledger_file, projector)   # whatever a failed write left out
    rows = folder.trial_rows(study)
    print(format_table(rows, status_columns(study, rows)))
    problems = audit(rows, projector, folder.ray_statuses())
    for problem in problems:
        sys.stderr.write(f"vqstudy: audit: {problem}\n")
    ok = all_ok([r["outcome"] for r in rows], study.num_trials) and not problems
    print(f"\n{study.name}: {outcome_summary(rows, study.num_trials)}"
          f"{f'; {len(problems)} missing from MLflow' if problems else ''}; study folder {folder.root}; "
          f"MLflow {records.tracking_uri}")
    print(tracking.view_hint(records.tracking_uri, records.experiment_id))
    return ok


def _interrupted(interrupt: Interrupt, study: Study, folder: StudyFolder, projector: Projector) -> int:
    """Stopped by a signal: Tune saved its state with the running trials still running and
    the recorder committed it; MLflow gets what was committed, and the user the next step."""
    project(folder.ledger_file, projector)
    rows = folder.trial_rows(study)
    sys.stderr.write(f"vqstudy: {study.name}: {interrupt.reason}: interrupted after "
                     f"{outcome_summary(rows, study.num_trials)} — {_resume_hint(folder)}\n")
    return interrupt.exit_code


def _prepare(study: Study, folder: StudyFolder, uri: str, storage_uri: str | None, storage: Storage) -> Records:
    """Write the study folder and the MLflow experiment + parent run (driver side, before any
    trial: this also creates the SQLite schema once instead of racing in every trial)."""
    folder.write_study(study)
    local = uri.startswith("sqlite:") or uri.startswith("file:")
    experiment_id = tracking.ensure_experiment(uri, study.experiment, folder.artifact_root if local else None,
                                               study.description)
    params = {"study.num_trials": study.num_trials, "study.grid": json.dumps(study.grid),
              "study.repeats": study.sweep.repeats, "study.metric": ",".join(study.sweep.metric)}
    summary = sweep_summary(study)
    tags = {**tracking.base_tags(study.name, study.path), "vqstudy.sweep": summary,
            tracking.NOTE_TAG: f"{study.description}\n\n{summary}".strip()}
    parent = tracking.start_parent(uri, experiment_id, study.name, tags, params)
    tracking.log_artifacts(uri, parent, [folder.root / STUDY_FILE])
    records = Records(uri, experiment_id, parent, str(study.path.resolve()) if study.path else None,
                      storage=storage_uri, experiment_dir=storage.name)
    folder.write_records(records)
    return records


def run(study: Study, out_dir: Path, address: str | None = None, tracking_uri: str | None = None,
        storage_uri: str | None = None) -> int:
    """Run a study into `out_dir`; 0 if every trial finished, 1 otherwise."""
    folder = StudyFolder(Path(out_dir).resolve())
    folder.check_new()
    if not (address or os.environ.get("RAY_ADDRESS")):
        preflight.check_local_gpus(study)
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or folder.default_tracking_uri
    preflight.check_tracking_uri(uri)
    cluster = address or os.environ.get("RAY_ADDRESS")
    sys.stderr.write(f"{study.name}: {study.num_trials} trials into {folder.root}; "
                     f"{f'joining the Ray cluster at {cluster}' if cluster else 'starting Ray'}...\n")
    # Each study gets its own experiment folder in a shared storage; in its own folder, `ray/`.
    storage = Storage(check_uri(storage_uri), f"{study.name}-{time.strftime('%Y%m%d-%H%M%S')}") if storage_uri \
        else Storage(str(folder.root), RAY_DIR)
    _preflight(study, storage, uri, connect(address))
    try:
        folder.root.mkdir(parents=True, exist_ok=True)
        ledger = Ledger(folder.ledger_file)   # the study's lock, held until the driver exits
    except OSError as e:
        raise ConfigError(f"--out: cannot write {folder.root} ({e.strerror})") from None
    try:
        folder.check_new()   # again, holding the lock: another run may have started meanwhile
        records = _prepare(study, folder, uri, storage_uri, storage)
        return _fit(lambda recorder: new_tuner(study, storage, recorder), study, folder, records, ledger)
    finally:
        ledger.close()


def resume(out_dir: Path, address: str | None = None) -> int:
    """Finish an interrupted study from its last commit (snapshot.py): finished trials stay,
    unfinished and errored ones continue from their last checkpoints, points never handed
    out start; the same parent run is reopened. A study killed before its first commit has
    nothing to keep and starts again (same records); one from before commits existed is
    resumed from Ray's own state if that can resume it exactly (folder.check_ray_state)."""
    folder = StudyFolder(Path(out_dir).resolve())
    study, records = folder.load()
    storage = folder.storage(records)
    commit = snapshot.committed(folder.state_dir)
    ledger = Ledger(folder.ledger_file, commit.ledger_bytes if commit else None)
    try:
        folder.relocate(records)   # a moved or copied folder writes into its own store
        legacy = commit is None and folder.has_trials()
        if legacy:
            folder.check_ray_state(records)
        tracking.start_parent(records.tracking_uri, records.experiment_id, study.name, {}, {}, records.parent_run_id)
        _preflight(study, storage, records.tracking_uri, connect(address))
        project(folder.ledger_file, _projector(study, folder, records))   # what a killed driver did not write
        if commit is not None:
            snapshot.restore(commit, folder.state_dir, storage)
        elif not legacy:
            print(f"{study.name}: nothing was committed before the driver stopped; starting the study again")
            clear(storage)
            return _fit(lambda recorder: new_tuner(study, storage, recorder), study, folder, records, ledger)
        return _fit(lambda recorder: restored_tuner(study, storage, recorder), study, folder, records, ledger)
    finally:
        ledger.close()
