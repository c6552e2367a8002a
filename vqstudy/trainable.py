"""What runs inside a Ray worker: one trial, from its `TrialSpec` to its last report.

The driver hands every trial the same typed `TrialSpec` (through `tune.with_parameters`);
Tune hands each its own swept keys as `config`. The trial calls the shared `train()` with
a `Reporter`, which sends each evaluation to Tune (with the checkpoint train() just wrote,
at most every `sweep.checkpoint_interval_s` seconds and at the last step). A trial never
touches the tracking store or the study folder: the driver records what it reports
(recorder.py), and its figures travel in its final checkpoint. Its scratch files live in a
temporary folder on the node that runs it. A restarted trial (crash retry or `vqstudy
resume`) continues from Tune's checkpoint and says so in its first report. A diverged
trial reports its outcome instead of raising, so Tune does not retry a deterministic failure.

Tune keeps running statistics of every numeric key a trial reports, in its experiment
state, for every trial: a report carries only what Tune acts on (the step, the study's
metrics, the outcome) as keys, and the rest of an evaluation's metrics as one JSON string
under `PACKED`, which the driver unpacks (`unpack`).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .outcome import Outcome

FIGURES_DIR = "figures"   # inside the checkpoint folder; the driver copies them out (recorder.py)
PACKED = "vqstudy"        # the report key holding the metrics Tune does not act on, as JSON


@dataclass(frozen=True)
class TrialSpec:
    """What every trial of a study shares; its own keys come as Tune's `config`."""
    base: dict[str, Any]            # the study's base config, flat dotted keys
    artifacts: bool                 # draw per-trial figures
    cpu: float                      # torch threads
    checkpoint_interval_s: float
    tune_keys: tuple[str, ...] = ("recon_mse",)   # what the searcher and scheduler read (sweep.metric)
    gpu: float = 0.0                # GPUs per trial: a trial given none trains on the CPU under train.device: auto

    def to_tune(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """A report for Tune: the keys it acts on, everything else packed in one string."""
        keep = {k: metrics[k] for k in ("step", "outcome", "failure", *self.tune_keys) if k in metrics}
        return {**keep, PACKED: json.dumps({k: v for k, v in metrics.items() if k not in keep})}


def unpack(result: dict[str, Any]) -> dict[str, Any]:
    """A Tune result's keys with the packed metrics put back beside them."""
    return {**json.loads(result.get(PACKED, "{}")), **{k: v for k, v in result.items() if k != PACKED}}


class Reporter:
    """The `report` train() calls at each evaluation, and its `on_end`."""

    def __init__(self, spec: TrialSpec, work: Path, steps: int, restored_at: int | None):
        self.spec, self.work, self.steps = spec, work, steps
        self.extra: dict[str, Any] = {} if restored_at is None else {"restored_at_step": restored_at}
        self.reporting_s = 0.0           # time in tune.report (with its checkpoint copy)
        self.persisted_at = -math.inf    # when Tune last persisted a checkpoint (a copy costs ~10 ms)

    def __call__(self, metrics: dict) -> None:
        from ray import tune

        last = metrics["step"] == self.steps
        persist = last or time.perf_counter() - self.persisted_at >= self.spec.checkpoint_interval_s
        if last:
            self.extra["reporting_time_s"] = self.reporting_s
        t0 = time.perf_counter()
        tune.report(self.spec.to_tune({**metrics, **self.extra}), checkpoint=tune.Checkpoint.from_directory(self.work) if persist else None)
        self.extra = {}
        self.persisted_at = t0 if persist else self.persisted_at
        self.reporting_s += time.perf_counter() - t0

    def on_end(self, trained) -> None:
        """Figures into the folder the last checkpoint persists. train() calls this before its
        last report, inside which Tune may stop the trial (ASHA's max_t)."""
        from .figures import trial_figures

        t0 = time.perf_counter()
        if self.spec.artifacts:
            trial_figures(trained, self.work / FIGURES_DIR)
        self.extra["artifacts_time_s"] = time.perf_counter() - t0


def _restore_work(work: Path) -> int | None:
    """Fill the scratch folder with Tune's latest checkpoint of this trial, if it has one;
    returns the step it was written at."""
    from ray import tune

    from .train import checkpoint_step

    checkpoint = tune.get_checkpoint()
    if not checkpoint:
        return None
    with checkpoint.as_directory() as d:
        shutil.copytree(d, work, dirs_exist_ok=True)
    return checkpoint_step(work)


def _rooted(flat: dict[str, Any]) -> dict[str, Any]:
    """A relative data.root is the directory the study was started from: Tune runs each
    trial in its own folder (and says where it started in TUNE_ORIG_WORKING_DIR)."""
    root, start = flat.get("data.root"), os.environ.get("TUNE_ORIG_WORKING_DIR")
    if root and start and not os.path.isabs(os.path.expanduser(root)):
        return {**flat, "data.root": os.path.join(start, root)}
    return flat


def run_trial(config: dict[str, Any], spec: TrialSpec) -> None:
    """One trial: the study's base config + this trial's keys -> train()."""
    import torch
    from ray import tune

    from .config import TrialConfig
    from .train import Diverged, train

    torch.set_num_threads(max(1, int(spec.cpu)))
    cfg = TrialConfig.from_dict(_rooted({**spec.base, **config}))
    if spec.gpu == 0 and cfg.train.device == "auto":   # whatever GPUs the node has belong to other trials
        cfg = cfg.updated({"train.device": "cpu"})
    work = Path(tempfile.mkdtemp(prefix=f"vqstudy-{tune.get_context().get_trial_id()}-"))
    try:
        reporter = Reporter(spec, work, cfg.train.steps, _restore_work(work))
        train(cfg, report=reporter, checkpoint_dir=work, on_end=reporter.on_end)
    except Diverged as e:
        last = e.metrics or {"step": e.step, "recon_mse": math.nan}
        tune.report(spec.to_tune({**last, "outcome": Outcome.DIVERGED.value, "failure": str(e)}))
    finally:
        shutil.rmtree(work, ignore_errors=True)
