"""The driver: connect to Ray, build the Tuner for a study, run or restore it, and settle
the records when it ends.

    run:    validate resources -> lock the ledger -> connect -> folder + MLflow parent run -> Tuner.fit
    resume: read the folder -> lock the ledger -> replay it into MLflow -> connect -> Tuner.restore -> fit
    both:   drain the recorder -> replay the ledger -> trial rows -> audit -> table -> parent run closed

What a trial does in its worker is trainable.py; what the driver records of it is
recorder.py (ledger, then MLflow); the folder's layout is folder.py. Ray is imported
inside functions only, so `--dry-run` and bad input stay fast.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from . import tracking
from .catalogue import HEADLINE
from .errors import ConfigError
from .folder import Records, StudyFolder
from .ledger import Ledger
from .outcome import Outcome, all_ok, from_ray
from .recorder import Projector, audit, make_recorder, project
from .study import Study
from .tables import fmt, format_table, outcome_summary, status_columns
from .trainable import TrialSpec, run_trial


def _quiet_driver() -> None:
    """vqstudy prints its own progress and table: turn off Tune's boxes and the warning that
    every checkpoint snapshots the experiment state (with num_to_keep=1 that is intended: a
    resume then always sees the latest checkpoint), and MLflow's schema-creation INFO lines."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    logging.getLogger("mlflow").setLevel(logging.WARNING)


def connect(address: str | None) -> None:
    """Join `address` (or RAY_ADDRESS), else start a local instance sized to this machine,
    listening on loopback only, without a dashboard. Reuses an instance this process has.

    Ray 2.60's ray.init turns a node IP of 127.0.0.1 into the machine's public address and
    its servers then listen on every interface. With cluster mode off (Ray's default on
    macOS and Windows laptops, switched by RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read when
    Ray is imported) the node is 127.0.0.1 and every server binds loopback."""
    _quiet_driver()
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return
    quiet = dict(logging_level=logging.WARNING, log_to_driver=False)
    if not address:
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, **quiet)
        return
    try:
        ray.init(address=address, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ConfigError(f"--address: cannot join the Ray cluster at {address!r}: {str(e).splitlines()[0]}") from None


def check_cluster_fits(study: Study) -> None:
    """A trial asking for more than the cluster has would wait forever: refuse it now."""
    import ray

    have = ray.cluster_resources()
    for kind, need in (("CPU", study.resources.cpu), ("GPU", study.resources.gpu)):
        if need > have.get(kind, 0):
            raise ConfigError(f"{study.source}: resources.{kind.lower()}: {need:g} asked but the Ray cluster "
                              f"has {have.get(kind, 0):g} {kind}s")


def local_gpus() -> int:
    import torch

    return torch.cuda.device_count()


# -- progress ----------------------------------------------------------------------------------
def _progress_callback(study: Study):
    from ray.tune import Callback

    class Progress(Callback):
        """One line per trial that ends: long studies show where they are."""

        def __init__(self):
            self.done = 0

        def _line(self, trial, outcome: Outcome) -> None:
            self.done += 1
            r = trial.last_result or {}
            params = " ".join(f"{k.split('.')[-1]}={fmt(trial.config.get(k), 3)}" for k in study.varied_keys)
            metric = " ".join(f"{k}={fmt(r[k])}" for k in HEADLINE if k in r)
            sys.stderr.write(f"[{self.done}/{study.num_trials}] {trial.trial_id} {outcome.value:<13} {params} {metric}\n")
            sys.stderr.flush()

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._line(trial, from_ray("TERMINATED", trial.last_result or {}, study.planned_steps(trial.config)))

        def on_trial_error(self, iteration, trials, trial, **info):
            self._line(trial, Outcome.FAILED)

    return Progress()


# -- the Tuner ------------------------------------------------------------------------------------
def _trainable(study: Study):
    from ray import tune

    spec = TrialSpec(base=study.base.to_flat(), artifacts=study.tracking.artifacts, cpu=study.resources.cpu,
                     checkpoint_interval_s=study.sweep.checkpoint_interval_s)
    resources = {"cpu": study.resources.cpu, "gpu": study.resources.gpu}
    return tune.with_resources(tune.with_parameters(run_trial, spec=spec), resources)


def _projector(study: Study, folder: StudyFolder, records: Records) -> Projector:
    study_path = Path(records.study_path) if records.study_path else None
    return Projector(records.tracking_uri, records.experiment_id, records.parent_run_id, study.base.to_flat(),
                     tracking.base_tags(study.name, study_path), folder.root, folder.figures_dir)


def _new_tuner(study: Study, folder: StudyFolder, recorder):
    from ray import tune

    from .search import make_searcher

    tune_config = tune.TuneConfig(search_alg=make_searcher(study), scheduler=study.scheduler.build(study),
                                  num_samples=study.num_trials, reuse_actors=True,
                                  max_concurrent_trials=study.resources.max_concurrent,
                                  trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}")
    run_config = tune.RunConfig(
        name=folder.ray_dir.name, storage_path=str(folder.root),
        failure_config=tune.FailureConfig(max_failures=study.sweep.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        callbacks=[recorder, _progress_callback(study)], verbose=0)
    return tune.Tuner(_trainable(study), tune_config=tune_config, run_config=run_config)


def _fit(tuner, study: Study, folder: StudyFolder, records: Records, recorder, projector: Projector) -> int:
    """Run the Tuner, bring MLflow up to the ledger, audit it against Ray's final view and
    print the table; 0 if every trial finished (or was stopped early by the scheduler) and
    the audit found its record, 1 otherwise."""
    ok = False
    try:
        tuner.fit()
        recorder.drain()
        project(folder.ledger_file, projector)   # whatever a failed write left out
        rows = folder.trial_rows(study)
        print(format_table(rows, status_columns(study, rows)))
        problems = audit(rows, projector)
        for problem in problems:
            sys.stderr.write(f"vqstudy: audit: {problem}\n")
        ok = all_ok([r["outcome"] for r in rows], study.num_trials) and not problems
        print(f"\n{study.name}: {outcome_summary(rows, study.num_trials)}"
              f"{f'; {len(problems)} missing from MLflow' if problems else ''}; study folder {folder.root}; "
              f"MLflow {records.tracking_uri}")
    finally:
        tracking.finish_parent(records.tracking_uri, records.parent_run_id, ok)
    return 0 if ok else 1


def _start(tuner_for, study: Study, folder: StudyFolder, records: Records, ledger: Ledger) -> int:
    projector = _projector(study, folder, records)
    recorder = make_recorder(study, ledger, projector)
    return _fit(tuner_for(recorder), study, folder, records, recorder, projector)


def _prepare(study: Study, folder: StudyFolder, tracking_uri: str | None) -> Records:
    """Write the study folder and the MLflow experiment + parent run (driver side, before any
    trial: this also creates the SQLite schema once instead of racing in every trial)."""
    folder.write_study(study)
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or folder.default_tracking_uri
    local = uri.startswith("sqlite:") or uri.startswith("file:")
    experiment_id = tracking.ensure_experiment(uri, study.experiment, folder.artifact_root if local else None)
    params = {"study.num_trials": study.num_trials, "study.grid": json.dumps(study.grid),
              "study.repeats": study.sweep.repeats, "study.metric": ",".join(study.sweep.metric)}
    parent = tracking.start_parent(uri, experiment_id, study.name, tracking.base_tags(study.name, study.path), params)
    records = Records(uri, experiment_id, parent, str(study.path.resolve()) if study.path else None)
    folder.write_records(records)
    return records


def run(study: Study, out_dir: Path, address: str | None = None, tracking_uri: str | None = None) -> int:
    """Run a study into `out_dir`; 0 if every trial finished, 1 otherwise."""
    folder = StudyFolder(Path(out_dir).resolve())
    if folder.has_run():
        raise ConfigError(f"--out: {folder.root} already holds a study; `vqstudy resume {folder.root}` continues it, "
                          f"or choose another --out")
    if study.resources.gpu > 0 and not (address or os.environ.get("RAY_ADDRESS")) and local_gpus() == 0:
        raise ConfigError(f"{study.source}: resources.gpu: {study.resources.gpu:g} asked but this machine has no GPU")
    connect(address)
    check_cluster_fits(study)
    folder.root.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(folder.ledger_file)
    try:
        records = _prepare(study, folder, tracking_uri)
        return _start(lambda recorder: _new_tuner(study, folder, recorder), study, folder, records, ledger)
    finally:
        ledger.close()


def resume(out_dir: Path, address: str | None = None) -> int:
    """Finish an interrupted study: finished trials stay, unfinished and errored ones continue
    from their last checkpoints, trials never started start; the same parent run is reopened."""
    folder = StudyFolder(Path(out_dir).resolve())
    study, records = folder.load()
    if not folder.has_run():
        raise ConfigError(f"{folder.root}: the study never reached Ray (no {folder.ray_dir.name}/); run it again")
    folder.check_ray_state()
    ledger = Ledger(folder.ledger_file)
    try:
        tracking.start_parent(records.tracking_uri, records.experiment_id, study.name, {}, {}, records.parent_run_id)
        project(folder.ledger_file, _projector(study, folder, records))  # what the killed driver did not write
        connect(address)
        check_cluster_fits(study)
        return _start(lambda recorder: _restored_tuner(study, folder, recorder), study, folder, records, ledger)
    finally:
        ledger.close()


def _restored_tuner(study: Study, folder: StudyFolder, recorder):
    """Tune's experiment from its stored state, with this session's callbacks."""
    from ray import tune

    # Tune restores the callbacks it pickled with the experiment: the recorder among them
    # unpickles as this driver's live `recorder` (recorder._live).
    return tune.Tuner.restore(str(folder.ray_dir), trainable=_trainable(study), resume_unfinished=True,
                              resume_errored=True)
