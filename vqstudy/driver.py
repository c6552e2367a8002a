"""The driver: connect to Ray, check the cluster can run the study, build the Tuner, run or
restore it, and settle the records when it ends.

    run:    refuse a used folder -> connect -> preflight -> lock the ledger -> folder + MLflow
            parent run -> Tuner.fit
    resume: read the folder -> lock the ledger, cut back to the last commit -> replay it into
            MLflow -> connect -> preflight -> the committed Ray state into the storage ->
            Tuner.restore -> fit (nothing committed yet: a fresh Tuner, same records)
    both:   commit and drain the recorder -> replay the ledger -> trial rows -> audit -> table
            -> parent closed

What a trial does in its worker is trainable.py; what the driver records of it is
recorder.py (ledger, then MLflow); the folder's layout is folder.py; where Ray keeps its
state is storage.py; the checks before any trial are preflight.py. Ray is imported inside
functions only, so `--dry-run` and bad input stay fast.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from . import preflight, snapshot, tracking
from .errors import ConfigError
from .folder import RAY_DIR, Records, StudyFolder
from .interrupt import Interrupt, TuneWords
from .ledger import Ledger
from .outcome import all_ok
from .progress import progress_callback
from .recorder import Committer, Projector, audit, make_recorder, project
from .storage import Storage, check_uri, clear, prune_checkpoints
from .study import Study
from .tables import format_table, outcome_summary, status_columns
from .trainable import TrialSpec, run_trial


TUNE_WORDS = TuneWords()
SYNC_PERIOD_S = 5
STATE_PERIOD_S = 2.0
STATE_S_PER_TRIAL = 0.002


def connect(address: str | None) -> bool:
    """Join `address` (or RAY_ADDRESS), else start a local instance sized to this machine,
    listening on loopback only, without a dashboard; True when the instance is this
    process's own (one machine). Reuses an instance this process has.

    Ray 2.60's ray.init turns a node IP of 127.0.0.1 into the machine's public address and
    its servers then listen on every interface. With cluster mode off (Ray's default on
    macOS and Windows laptops, switched by RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read when
    Ray is imported) the node is 127.0.0.1 and every server binds loopback."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")   # vqstudy prints its own progress and table
    # Tune's per-trial result.json/progress.csv/params files on the driver, copied to the
    # storage with its state: the ledger records all of it already.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    TUNE_WORDS.install()
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return len(ray.nodes()) == 1
    quiet = dict(logging_level=logging.WARNING, log_to_driver=False)
    if not address:
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, **quiet)
        return True
    try:
        ray.init(address=address, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ConfigError(f"--address: cannot join the Ray cluster at {address!r}: {str(e).splitlines()[0]}") from None
    return False


def local_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def _preflight(study: Study, storage: Storage, tracking_uri: str, own_instance: bool) -> None:
    nodes = preflight.trial_nodes(study)
    preflight.check_tracking(tracking_uri)
    if not own_instance or not storage.is_local:   # one machine sees its own disk
        preflight.check_storage(storage, nodes)


# -- the Tuner ------------------------------------------------------------------------------------
def _trainable(study: Study):
    from ray import tune

    spec = TrialSpec(base=study.base.to_flat(), artifacts=study.tracking.artifacts, cpu=study.resources.cpu,
                     checkpoint_interval_s=study.sweep.checkpoint_interval_s, tune_keys=tuple(study.sweep.metric))
    resources = {"cpu": study.resources.cpu, "gpu": study.resources.gpu}
    return tune.with_resources(tune.with_parameters(run_trial, spec=spec), resources)


def _trial_dirname(trial) -> str:
    """A module-level function, not a lambda: Tune pickles it into every trial's state."""
    return f"trial_{trial.trial_id}"


def _set_state_period(study: Study) -> None:
    """How often Tune saves its experiment state, and so how often the recorder commits
    (snapshot.py): what a killed driver loses, and how late MLflow shows a result. Tune's
    own period ("auto", 10 s or more) would lose more; but the state holds every trial and
    each save rewrites it, so beyond 1,000 trials the period grows with the study (2 ms
    a trial) to keep the cost of saving per second flat. TUNE_GLOBAL_CHECKPOINT_S wins."""
    period = max(STATE_PERIOD_S, study.num_trials * STATE_S_PER_TRIAL)
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", f"{period:g}")


def _new_tuner(study: Study, storage: Storage, recorder):
    from ray import tune

    from .search import make_searcher

    fs, root = storage.location()
    tune_config = tune.TuneConfig(search_alg=make_searcher(study), scheduler=study.scheduler.build(study),
                                  num_samples=study.num_trials, reuse_actors=True,
                                  max_concurrent_trials=study.resources.max_concurrent,
                                  trial_dirname_creator=_trial_dirname)
    run_config = tune.RunConfig(
        name=storage.name, storage_path=root, storage_filesystem=None if storage.is_local else fs,
        failure_config=tune.FailureConfig(max_failures=study.sweep.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=None),   # pruned when the Tuner returns
        # a remote storage receives Tune's state (and the trials' files) every few seconds
        # instead of Tune's default 5 minutes, so that a resume finds a recent state
        sync_config=tune.SyncConfig(sync_period=SYNC_PERIOD_S),
        callbacks=[recorder, progress_callback(study)], verbose=0)
    return tune.Tuner(_trainable(study), tune_config=tune_config, run_config=run_config)


def _restored_tuner(study: Study, storage: Storage, recorder):
    """Tune's experiment from its stored state. Tune restores the callbacks it pickled with
    the experiment: the recorder among them unpickles as this driver's live `recorder`."""
    from ray import tune

    fs, path = storage.filesystem()
    return tune.Tuner.restore(path, trainable=_trainable(study), resume_unfinished=True, resume_errored=True,
                              storage_filesystem=None if storage.is_local else fs)


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
    recorder = make_recorder(study, Committer(ledger, projector, folder.state_dir), interrupt)
    _set_state_period(study)
    status = "FAILED"
    try:
        tuner_for(recorder).fit()
        recorder.drain()
        if interrupt.signum:
            status = "KILLED"
            return _interrupted(interrupt, study, folder, projector)
        prune_checkpoints(folder.storage(records))
        ok = _settle(study, folder, records, projector)
        status = "FINISHED" if ok else "FAILED"
        return 0 if ok else 1
    finally:
        interrupt.disarm()
        tracking.close_study(records.tracking_uri, records.experiment_id, records.parent_run_id, status)


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
    return ok


def _interrupted(interrupt: Interrupt, study: Study, folder: StudyFolder, projector: Projector) -> int:
    """Stopped by a signal: Tune saved its state with the running trials still running and
    the recorder committed it; MLflow gets what was committed, and the user the next step."""
    project(folder.ledger_file, projector)
    rows = folder.trial_rows(study)
    sys.stderr.write(f"vqstudy: {study.name}: {interrupt.name}: interrupted after "
                     f"{outcome_summary(rows, study.num_trials)} — continue with: vqstudy resume {folder.root}\n")
    return interrupt.exit_code


def _prepare(study: Study, folder: StudyFolder, uri: str, storage_uri: str | None, storage: Storage) -> Records:
    """Write the study folder and the MLflow experiment + parent run (driver side, before any
    trial: this also creates the SQLite schema once instead of racing in every trial)."""
    folder.write_study(study)
    local = uri.startswith("sqlite:") or uri.startswith("file:")
    experiment_id = tracking.ensure_experiment(uri, study.experiment, folder.artifact_root if local else None)
    params = {"study.num_trials": study.num_trials, "study.grid": json.dumps(study.grid),
              "study.repeats": study.sweep.repeats, "study.metric": ",".join(study.sweep.metric)}
    parent = tracking.start_parent(uri, experiment_id, study.name, tracking.base_tags(study.name, study.path), params)
    records = Records(uri, experiment_id, parent, str(study.path.resolve()) if study.path else None,
                      storage=storage_uri, experiment_dir=storage.name)
    folder.write_records(records)
    return records


def run(study: Study, out_dir: Path, address: str | None = None, tracking_uri: str | None = None,
        storage_uri: str | None = None) -> int:
    """Run a study into `out_dir`; 0 if every trial finished, 1 otherwise."""
    folder = StudyFolder(Path(out_dir).resolve())
    folder.check_new()
    if study.resources.gpu > 0 and not (address or os.environ.get("RAY_ADDRESS")) and local_gpus() == 0:
        raise ConfigError(f"{study.source}: resources.gpu: {study.resources.gpu:g} asked but this machine has no GPU")
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or folder.default_tracking_uri
    # Each study gets its own experiment folder in a shared storage; in its own folder, `ray/`.
    storage = Storage(check_uri(storage_uri), f"{study.name}-{time.strftime('%Y%m%d-%H%M%S')}") if storage_uri \
        else Storage(str(folder.root), RAY_DIR)
    _preflight(study, storage, uri, connect(address))
    folder.root.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(folder.ledger_file)   # the study's lock, held until the driver exits
    try:
        folder.check_new()   # again, holding the lock: another run may have started meanwhile
        records = _prepare(study, folder, uri, storage_uri, storage)
        return _fit(lambda recorder: _new_tuner(study, storage, recorder), study, folder, records, ledger)
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
            return _fit(lambda recorder: _new_tuner(study, storage, recorder), study, folder, records, ledger)
        return _fit(lambda recorder: _restored_tuner(study, storage, recorder), study, folder, records, ledger)
    finally:
        ledger.close()
