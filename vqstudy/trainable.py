"""What runs inside a Ray worker: one trial, from its `TrialSpec` to a closed MLflow run.

The driver hands every trial the same typed `TrialSpec` (through `tune.with_parameters`);
Tune hands each its own swept keys as `config`. The trial calls the shared `train()` with
a `Reporter`, which sends each evaluation to MLflow (one batched write, exactly once per
step, also after a restart) and to Tune (with the checkpoint train() just wrote, at most
every `sweep.checkpoint_interval_s` seconds and at the last step), and which closes the
MLflow run with the trial's `Outcome`. A restarted trial (crash retry or `vqstudy resume`)
continues from Tune's checkpoint and reopens its run. A diverged trial reports its
outcome instead of raising, so Tune does not retry a deterministic failure.
"""
from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import tracking
from .outcome import Outcome

WORK_DIR = "work"   # a trial's scratch folder (its checkpoint and figures), inside Tune's trial dir


@dataclass(frozen=True)
class TrialSpec:
    """What every trial of a study shares; its own keys come as Tune's `config`."""
    base: dict[str, Any]            # the study's base config, flat dotted keys
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    tags: dict[str, str]
    artifacts: bool                 # log per-trial figures
    cpu: float                      # torch threads
    checkpoint_interval_s: float


class Reporter:
    """The `report` train() calls at each evaluation, and its `on_end`."""

    def __init__(self, run: tracking.TrialRun, spec: TrialSpec, work: Path, steps: int):
        self.run, self.spec, self.work, self.steps = run, spec, work, steps
        self.reporting_s = 0.0           # time in MLflow writes and tune.report (with its checkpoint copy)
        self.persisted_at = -math.inf    # when Tune last persisted a checkpoint (a copy costs ~10 ms)
        self.closed = False

    def __call__(self, metrics: dict) -> None:
        from ray import tune

        t0 = time.perf_counter()
        if metrics["step"] > self.run.logged_step:  # a restart may redo steps MLflow already holds
            self.run.log_metrics(metrics, step=metrics["step"])
        persist = metrics["step"] == self.steps or t0 - self.persisted_at >= self.spec.checkpoint_interval_s
        self.reporting_s += time.perf_counter() - t0
        t1 = time.perf_counter()
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(self.work) if persist else None)
        self.persisted_at = t1 if persist else self.persisted_at
        self.reporting_s += time.perf_counter() - t1

    def on_end(self, trained) -> None:
        """Figures, timing metrics, FINISHED: the trial's last words to MLflow. train() calls
        this before its last report, inside which Tune may stop the trial (ASHA's max_t)."""
        from .figures import trial_figures

        t0 = time.perf_counter()
        if self.spec.artifacts:
            tracking.log_artifacts(self.spec.tracking_uri, self.run.run_id,
                                   trial_figures(trained, self.work / "figures"))
        self.run.log_metrics({"reporting_time_s": self.reporting_s, "artifacts_time_s": time.perf_counter() - t0},
                             step=trained.metrics["step"])
        self.run.finish(Outcome.FINISHED)
        self.closed = True


def _restore_work(work: Path, run: tracking.TrialRun) -> None:
    """Fresh scratch folder, holding Tune's latest checkpoint of this trial if it has one."""
    from ray import tune

    from .train import checkpoint_step

    shutil.rmtree(work, ignore_errors=True)
    checkpoint = tune.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            shutil.copytree(d, work)
        run.restored_at(checkpoint_step(work))
    work.mkdir(parents=True, exist_ok=True)


def run_trial(config: dict[str, Any], spec: TrialSpec) -> None:
    """One trial: the study's base config + this trial's keys -> train()."""
    import torch
    from ray import tune

    from .config import TrialConfig
    from .train import Diverged, train

    torch.set_num_threads(max(1, int(spec.cpu)))
    ctx = tune.get_context()
    cfg = TrialConfig.from_dict({**spec.base, **config})
    run = tracking.TrialRun.open(spec.tracking_uri, spec.experiment_id, spec.parent_run_id,
                                 ctx.get_trial_id(), ctx.get_trial_name(), cfg.to_flat(), spec.tags)
    work = Path(ctx.get_trial_dir()) / WORK_DIR
    _restore_work(work, run)
    reporter = Reporter(run, spec, work, cfg.train.steps)
    try:
        train(cfg, report=reporter, checkpoint_dir=work, on_end=reporter.on_end)
    except Diverged as e:
        run.finish(Outcome.DIVERGED, reason=str(e))
        tune.report({**(e.metrics or {"step": e.step, "recon_mse": math.nan}), "outcome": Outcome.DIVERGED.value})
    except SystemExit:  # Tune stopped the trial (a scheduler's decision, or shutdown)
        if not reporter.closed:
            run.stop(step=run.last_step)
        raise
    except BaseException as e:
        run.finish(Outcome.FAILED, reason=f"{type(e).__name__}: {e}")
        raise
