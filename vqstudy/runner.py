"""Ray Tune glue: the trainable around `train()`, the per-grid-point searcher, and
run / resume / status of a study folder.

Layout of a study folder (`--out DIR`, default runs/<name>):
    DIR/study.yaml     the study as resolved (includes merged, --set applied): what resume reruns
    DIR/vqstudy.json   tracking URI, experiment and parent-run ids, the original study path
    DIR/ray/           Ray Tune's experiment state, trial folders and checkpoints
    DIR/mlflow.db      the MLflow store, unless --tracking-uri / MLFLOW_TRACKING_URI say otherwise
    DIR/mlartifacts/   MLflow artifacts of that store

Ray is imported inside functions only, so `vqstudy run --dry-run` and bad input stay fast.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from . import tracking
from .config import ConfigError, all_keys
from .search import make_searcher
from .study import Study, format_table, parse_study

RAY_DIR = "ray"
STATE_FILE = "vqstudy.json"
STUDY_COPY = "study.yaml"
WORK_DIR = "work"


# -- the trainable (runs inside Ray workers) -------------------------------------------------
def run_trial(config: dict[str, Any], spec: dict[str, Any]) -> None:
    """One trial: base config + this trial's keys -> train(), reporting each evaluation to
    MLflow (one batched write, exactly once per step) and to Tune, with the checkpoint train()
    just wrote at most every `sweep.checkpoint_interval_s` seconds and at the last step.
    A restarted trial (crash retry or `vqstudy resume`) continues from Tune's checkpoint and
    reopens its MLflow run. A diverged trial ends as FAILED in MLflow with its reason, and
    reports `diverged: 1` to Tune instead of raising, so Tune does not retry a deterministic
    failure. A trial Tune stops (SystemExit inside tune.report) ends KILLED; the driver then
    marks it FINISHED with the step it stopped at (see tracking.reconcile_children)."""
    import torch
    from ray import tune

    from .artifacts import trial_figures
    from .config import TrialConfig
    from .train import Diverged, checkpoint_step, train

    torch.set_num_threads(max(1, int(spec["cpu"])))
    ctx = tune.get_context()
    cfg = TrialConfig.from_dict({**spec["base"], **config})
    run = tracking.TrialRun.open(spec["tracking_uri"], spec["experiment_id"], spec["parent_run_id"],
                                 ctx.get_trial_id(), ctx.get_trial_name(), cfg.to_flat(), spec["tags"])
    work = Path(ctx.get_trial_dir()) / WORK_DIR
    shutil.rmtree(work, ignore_errors=True)
    checkpoint = tune.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            shutil.copytree(d, work)
        run.restored_at(checkpoint_step(work))
    work.mkdir(parents=True, exist_ok=True)

    reporting_s = 0.0           # time in MLflow writes and tune.report (with its checkpoint copy)
    persisted_at = -math.inf    # when Tune last persisted a checkpoint (a copy costs ~10 ms)
    closed = False

    def close(final: dict) -> None:
        """Figures, timing metrics, FINISHED: the trial's last words to MLflow."""
        nonlocal closed
        t0 = time.perf_counter()
        if spec["artifacts"]:
            tracking.log_artifacts(spec["tracking_uri"], run.run_id, trial_figures(cfg, work, work / "figures"))
        run.log_metrics({"reporting_time_s": reporting_s, "artifacts_time_s": time.perf_counter() - t0},
                        step=final["step"])
        run.finish(ok=True)
        closed = True

    def report(metrics: dict) -> None:
        nonlocal reporting_s, persisted_at
        t0 = time.perf_counter()
        if metrics["step"] > run.logged_step:  # a restart may redo steps MLflow already holds
            run.log_metrics(metrics, step=metrics["step"])
        last = metrics["step"] == cfg.train.steps
        persist = last or t0 - persisted_at >= spec["checkpoint_interval_s"]
        reporting_s += time.perf_counter() - t0
        if last:  # close first: Tune may stop the trial inside its last report (ASHA's max_t)
            close(metrics)
        t1 = time.perf_counter()
        tune.report({**metrics, "diverged": 0}, checkpoint=tune.Checkpoint.from_directory(work) if persist else None)
        persisted_at = t1 if persist else persisted_at
        reporting_s += time.perf_counter() - t1

    try:
        final = train(cfg, report=report, checkpoint_dir=work)
    except Diverged as e:
        run.finish(ok=False, reason=f"diverged: {e}")
        last = e.metrics or {"step": e.step, "recon_mse": math.nan}
        tune.report({**last, "diverged": 1})
        return
    except SystemExit:  # Tune stopped the trial (a scheduler's decision, or shutdown)
        if not closed:
            run.stop(step=run.last_step)
        raise
    except BaseException as e:
        run.finish(ok=False, reason=f"{type(e).__name__}: {e}")
        raise
    if not closed:  # resumed from a checkpoint of its last step: train() reported nothing
        close(final)


# -- progress ----------------------------------------------------------------------------------
def _make_progress_callback(total: int, keys: list[str]):
    from ray.tune import Callback

    class Progress(Callback):
        """One line per finished or failed trial: long studies show where they are."""

        def __init__(self):
            self.done = 0

        def _line(self, trial, status: str) -> None:
            self.done += 1
            r = trial.last_result or {}
            params = " ".join(f"{k.split('.')[-1]}={_short(trial.config.get(k))}" for k in keys)
            metric = f"recon_mse={r['recon_mse']:.4g} utilization={r['utilization']:.3f}" \
                if "utilization" in r else ""
            sys.stderr.write(f"[{self.done}/{total}] {trial.trial_id} {status:<10} {params} {metric}\n")
            sys.stderr.flush()

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._line(trial, "DIVERGED" if (trial.last_result or {}).get("diverged") else "done")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._line(trial, "ERROR")

    return Progress()


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


# -- Ray -------------------------------------------------------------------------------------
def _quiet_driver() -> None:
    """vqstudy prints its own progress and table: turn off Tune's boxes and the warning that
    every checkpoint snapshots the experiment state (with num_to_keep=1 that is intended: a
    resume then always sees the latest checkpoint), and MLflow's schema-creation INFO lines."""
    import logging

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
    import logging

    _quiet_driver()
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return
    quiet = dict(logging_level=logging.WARNING, log_to_driver=False)
    if address:
        try:
            ray.init(address=address, **quiet)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ConfigError(f"--address: cannot join the Ray cluster at {address!r}: {str(e).splitlines()[0]}") from None
    else:
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, **quiet)


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


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def _scheduler(study: Study):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if study.scheduler.name == "fifo":
        return FIFOScheduler()
    max_evals = max(math.ceil(study.trial_config(p).train.steps / study.trial_config(p).train.eval_every)
                    for p in study.points())
    return ASHAScheduler(time_attr="training_iteration", metric=study.metric[0], mode=study.mode[0],
                         max_t=max_evals, grace_period=study.scheduler.grace_period,
                         reduction_factor=study.scheduler.reduction_factor)


def _trainable(study: Study, state: dict[str, Any]):
    from ray import tune

    spec = {
        "base": study.base.to_flat(), "tracking_uri": state["tracking_uri"],
        "experiment_id": state["experiment_id"], "parent_run_id": state["parent_run_id"],
        "tags": tracking.base_tags(study.name, Path(state["study_path"]) if state.get("study_path") else None),
        "artifacts": study.artifacts, "cpu": study.resources.cpu,
        "checkpoint_interval_s": study.checkpoint_interval_s,
    }
    resources = {"cpu": study.resources.cpu, "gpu": study.resources.gpu}
    return tune.with_resources(tune.with_parameters(run_trial, spec=spec), resources)


def _run_config(study: Study, out_dir: Path):
    from ray import tune

    return tune.RunConfig(
        name=RAY_DIR, storage_path=str(out_dir),
        failure_config=tune.FailureConfig(max_failures=study.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        callbacks=[_make_progress_callback(study.num_trials, study.varied_keys)],
        verbose=0,
    )


# -- run / resume / status ---------------------------------------------------------------------
def study_to_raw(study: Study) -> dict[str, Any]:
    """The resolved study as a study file (what DIR/study.yaml holds)."""
    sweep: dict[str, Any] = {"grid": study.grid, "repeats": study.repeats, "metric": study.metric,
                             "mode": study.mode, "max_failures": study.max_failures,
                             "checkpoint_interval_s": study.checkpoint_interval_s,
                             "scheduler": vars(study.scheduler)}
    if study.search:
        sweep["search"] = {"algorithm": study.search.algorithm, "num_samples": study.search.num_samples,
                           "sampler": study.search.sampler,
                           **{k: {d.kind: list(d.args)} for k, d in study.search.space.items()}}
    return {"name": study.name, "description": study.description, "base": study.base.to_dict(),
            "sweep": sweep, "resources": vars(study.resources),
            "tracking": {"experiment": study.experiment, "artifacts": study.artifacts}}


def _prepare(study: Study, out_dir: Path, tracking_uri: str | None) -> dict[str, Any]:
    """Write the study folder and the MLflow experiment + parent run (driver side, before Ray)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / STUDY_COPY).write_text(yaml.safe_dump(study_to_raw(study), sort_keys=False))
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or tracking.default_uri(out_dir)
    local = uri.startswith("sqlite:") or uri.startswith("file:")
    experiment_id = tracking.ensure_experiment(uri, study.experiment, out_dir / "mlartifacts" if local else None)
    state = {"study_path": str(study.path.resolve()) if study.path else None, "tracking_uri": uri,
             "experiment_id": experiment_id}
    tags = tracking.base_tags(study.name, study.path)
    params = {"study.num_trials": study.num_trials, "study.grid": json.dumps(study.grid),
              "study.repeats": study.repeats, "study.metric": ",".join(study.metric)}
    state["parent_run_id"] = tracking.start_parent(uri, experiment_id, study.name, tags, params)
    (out_dir / STATE_FILE).write_text(json.dumps(state, indent=2))
    return state


def _outcomes(study: Study, rows: list[dict[str, Any]]) -> dict[str, tuple[bool, int | None]]:
    """trial id -> (finished, step where the scheduler stopped it early, or None)."""
    out = {}
    for r in rows:
        planned = study.trial_config({k: v for k, v in r.items() if k in all_keys()}).train.steps
        finished = r["status"] == "TERMINATED"
        out[r["trial_id"]] = (finished, r["step"] if finished and r.get("step", planned) < planned else None)
    return out


def _fit(tuner, study: Study, out_dir: Path, state: dict[str, Any]) -> int:
    ok = False
    try:
        tuner.fit()
        rows = trial_rows(out_dir, study)
        tracking.reconcile_children(state["tracking_uri"], state["experiment_id"], _outcomes(study, rows))
        print(format_table(rows, table_columns(study, rows)))
        ok = len(rows) == study.num_trials and all(r["status"] == "TERMINATED" for r in rows)
        done = sum(r["status"] == "TERMINATED" for r in rows)
        print(f"\n{done}/{study.num_trials} trials finished; study folder {out_dir}; MLflow {state['tracking_uri']}")
    finally:
        tracking.finish_run(state["tracking_uri"], state["parent_run_id"], ok)
    return 0 if ok else 1


def run(study: Study, out_dir: Path, address: str | None = None, tracking_uri: str | None = None) -> int:
    """Run a study; 0 if every trial finished, 1 otherwise."""
    out_dir = out_dir.resolve()
    if (out_dir / RAY_DIR).exists():
        raise ConfigError(f"--out: {out_dir} already holds a study; `vqstudy resume {out_dir}` continues it, "
                          f"or choose another --out")
    if study.resources.gpu > 0 and not (address or os.environ.get("RAY_ADDRESS")) and local_gpus() == 0:
        raise ConfigError(f"{study.source}: resources.gpu: {study.resources.gpu:g} asked but this machine has no GPU")
    connect(address)
    check_cluster_fits(study)
    state = _prepare(study, out_dir, tracking_uri)
    from ray import tune

    tune_config = tune.TuneConfig(search_alg=make_searcher(study), scheduler=_scheduler(study),
                                  num_samples=study.num_trials, reuse_actors=True,
                                  max_concurrent_trials=study.resources.max_concurrent,
                                  trial_dirname_creator=_trial_dirname)
    tuner = tune.Tuner(_trainable(study, state), tune_config=tune_config, run_config=_run_config(study, out_dir))
    return _fit(tuner, study, out_dir, state)


def load_folder(out_dir: Path) -> tuple[Study, dict[str, Any]]:
    """The study and tracking state stored in a study folder (ConfigError if it is not one)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise ConfigError(f"{out_dir}: no such study folder")
    if not (out_dir / STATE_FILE).exists() or not (out_dir / STUDY_COPY).exists():
        raise ConfigError(f"{out_dir}: not a study folder (no {STATE_FILE}; `vqstudy run STUDY.yaml --out DIR` makes one)")
    state = json.loads((out_dir / STATE_FILE).read_text())
    study = parse_study(yaml.safe_load((out_dir / STUDY_COPY).read_text()), out_dir / STUDY_COPY)
    if state.get("study_path"):
        study.path = Path(state["study_path"])
    return study, state


def resume(out_dir: Path, address: str | None = None) -> int:
    """Finish an interrupted study: finished trials stay, unfinished and errored ones continue
    from their last checkpoints, trials never started start; the same parent run is reopened."""
    out_dir = Path(out_dir).resolve()
    study, state = load_folder(out_dir)
    if not (out_dir / RAY_DIR).exists():
        raise ConfigError(f"{out_dir}: the study never reached Ray (no {RAY_DIR}/); run it again")
    check_ray_state(out_dir / RAY_DIR)
    connect(address)
    check_cluster_fits(study)
    tracking.start_parent(state["tracking_uri"], state["experiment_id"], study.name, {}, {}, state["parent_run_id"])
    from ray import tune

    tuner = tune.Tuner.restore(str(out_dir / RAY_DIR), trainable=_trainable(study, state),
                               resume_unfinished=True, resume_errored=True)
    return _fit(tuner, study, out_dir, state)


def _grid_order(study: Study):
    """Sort key putting trials in the order of the study's points (then by trial id)."""
    index = {tuple(sorted(p.items())): i for i, p in enumerate(study.points())}
    keys = list(study.points()[0])

    def key(trial):
        point = tuple(sorted((k, trial.config.get(k)) for k in keys))
        return index.get(point, len(index)), trial.trial_id
    return key


def check_ray_state(ray_dir: Path) -> None:
    """Ray writes its experiment state in place (not atomically); a driver killed during that
    write leaves it empty, and Tune would then resume only part of the study without saying
    so. Refuse instead, naming the file."""
    states = sorted(ray_dir.glob("experiment_state-*.json"))
    if not states:
        raise ConfigError(f"{ray_dir}: no Ray experiment state to resume from")
    try:
        json.loads(states[-1].read_text())
    except ValueError:
        raise ConfigError(f"{states[-1]}: Ray's experiment state is empty or cut short (the driver was killed "
                          f"while Ray wrote it); this study cannot be resumed: run it again into a new --out") from None


def trial_rows(out_dir: Path, order: Study) -> list[dict[str, Any]]:
    """The trial table from Ray's stored experiment state (no Ray cluster needed), in grid order."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(Path(out_dir).resolve() / RAY_DIR))
    rows = []
    for t in sorted(analysis.trials, key=_grid_order(order)):
        r = t.last_result or {}
        status = "DIVERGED" if r.get("diverged") else t.status
        rows.append({"trial_id": t.trial_id, "status": status, "failures": t.num_failures, **t.config,
                     **{k: r[k] for k in ("step", "recon_mse", "utilization", "perplexity") if k in r}})
    return rows


def table_columns(study: Study, rows: list[dict[str, Any]]) -> list[str]:
    keys = study.varied_keys
    present = {k for r in rows for k in r}
    retried = ["failures"] if any(r.get("failures") for r in rows) else []  # shown only when a trial crashed
    return [c for c in ["trial_id", "status", *retried, *keys, "step", "recon_mse", "utilization", "perplexity"]
            if c in present]


def status(out_dir: Path) -> int:
    """Print the trial table from stored state; 0 if every trial finished."""
    out_dir = Path(out_dir)
    study, _ = load_folder(out_dir)
    if not (out_dir / RAY_DIR).exists():
        print(f"{study.name}: no trial started yet (0/{study.num_trials})")
        return 1
    rows = trial_rows(out_dir, study)
    print(format_table(rows, table_columns(study, rows)))
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    pending = study.num_trials - len(rows)
    summary = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())) + (f", {pending} not started" if pending else "")
    print(f"\n{study.name}: {summary} (of {study.num_trials})")
    return 0 if counts.get("TERMINATED", 0) == study.num_trials else 1
