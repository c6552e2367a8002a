"""Building Ray Tune's Tuner for a study: the trainable with its resources, the searcher and
scheduler, where Tune keeps its state, how often it saves it, and the driver's callbacks.
A new Tuner for `run`, one restored from the storage for `resume`."""
from __future__ import annotations

import os

from .progress import progress_callback
from .storage import Storage
from .study import Study
from .trainable import TrialSpec, run_trial

SYNC_PERIOD_S = 5
STATE_PERIOD_S = 2.0
STATE_S_PER_TRIAL = 0.002


def trainable(study: Study):
    from ray import tune

    spec = TrialSpec(base=study.base.to_flat(), artifacts=study.tracking.artifacts, cpu=study.resources.cpu,
                     gpu=study.resources.gpu,
                     checkpoint_interval_s=study.sweep.checkpoint_interval_s, tune_keys=tuple(study.sweep.metric))
    resources = {"cpu": study.resources.cpu, "gpu": study.resources.gpu}
    return tune.with_resources(tune.with_parameters(run_trial, spec=spec), resources)


def _trial_dirname(trial) -> str:
    """A module-level function, not a lambda: Tune pickles it into every trial's state."""
    return f"trial_{trial.trial_id}"


def set_state_period(study: Study) -> None:
    """How often Tune saves its experiment state, and so how often the recorder commits
    (snapshot.py): what a killed driver loses, and how late MLflow shows a result. Tune's
    own period ("auto", 10 s or more) would lose more; but the state holds every trial and
    each save rewrites it, so beyond 1,000 trials the period grows with the study (2 ms
    a trial) to keep the cost of saving per second flat. TUNE_GLOBAL_CHECKPOINT_S wins."""
    period = max(STATE_PERIOD_S, study.num_trials * STATE_S_PER_TRIAL)
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", f"{period:g}")


def new_tuner(study: Study, storage: Storage, recorder):
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
    return tune.Tuner(trainable(study), tune_config=tune_config, run_config=run_config)


def restored_tuner(study: Study, storage: Storage, recorder):
    """Tune's experiment from its stored state. Tune restores the callbacks it pickled with
    the experiment: the recorder among them unpickles as this driver's live `recorder`."""
    from ray import tune

    fs, path = storage.filesystem()
    return tune.Tuner.restore(path, trainable=trainable(study), resume_unfinished=True, resume_errored=True,
                              storage_filesystem=None if storage.is_local else fs)
