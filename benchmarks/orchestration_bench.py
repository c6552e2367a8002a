"""What running trials through vqstudy (Ray Tune + MLflow) costs over a plain loop, same run.

N identical short trials run (1) as a plain sequential loop of `train()` in this process,
and (2) as vqstudy studies on a local Ray instance, one trial at a time, each tracked in a
fresh MLflow SQLite store, with and without the per-trial figures. The one-time Ray start is
excluded (the instance is started before the clock). A study also has a fixed start-up
(MLflow schema, Tuner, worker processes), reported on its own. Per-trial overhead is
measured two ways: in-run, from the trial records of the same study (the time spent on
each trial outside train(), median over trials after the first), and as a slope against
the loop, (wall(2+N) - wall(2)) / N minus the loop's time per trial, which also absorbs
any drift of the machine's speed between the loop and the study. Logging share = time each trial spent in MLflow writes +
tune.report (recorded by the trial as `reporting_time_s`) / the trial's wall time (`train_time_s`).
Targets (issue 3): overhead <= 0.2 s per trial, logging <= 3% of trial time.

    python benchmarks/orchestration_bench.py [--trials 8] [--steps 600] [--eval-every 200]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from vqstudy import driver
from vqstudy.folder import StudyFolder
from vqstudy.study import parse_study
from vqstudy.train import train


def make_study(n: int, steps: int, eval_every: int, artifacts: bool, name: str):
    """N identical trials: the same config repeated through a grid over a no-op-valued key."""
    return parse_study({
        "name": name,
        "description": "orchestration benchmark",
        "base": {"data": {"name": "gaussian_mixture", "num_train": 4096, "num_eval": 2048},
                 "model": {"latent_dim": 8, "encoder_width": 64},
                 "quantizer": {"name": "vq", "codebook_size": 256},
                 "train": {"steps": steps, "eval_every": eval_every, "batch_size": 128, "device": "cpu"}},
        # data.root is unused by gaussian_mixture: n distinct values make n identical trials
        "sweep": {"grid": {"data.root": [f"unused{i}" for i in range(n)]}},
        "resources": {"cpu": 1, "max_concurrent": 1},
        "tracking": {"artifacts": artifacts},
    })


def plain_loop(study) -> float:
    """Seconds for the study's trials as a loop of train(), timed inside this process."""
    torch.set_num_threads(1)  # what a trial with resources.cpu = 1 gets
    t0 = time.perf_counter()
    for point in study.points():
        train(study.trial_config(point))
    return time.perf_counter() - t0


def plain_loop_in_fresh_process(n: int, steps: int, eval_every: int) -> float:
    """The loop in a new process started like a Ray worker (OMP_NUM_THREADS=1, no Ray
    driver threads beside it), so that both sides train under the same conditions."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--loop", "--trials", str(n), "--steps", str(steps), "--eval-every", str(eval_every)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def through_vqstudy(study, out: Path) -> tuple[float, list[float], list[float], list[float]]:
    """Run the study; returns its wall time, and per trial: logging share, figure time, and
    the time the study spent on the trial outside train() (for every trial after the first,
    which carries the worker start-up): the gap since the previous trial ended plus the
    trial's run time minus its train_time_s. Read from the run records of the same run,
    this is immune to the machine's speed drifting between separate measurements."""
    t0 = time.perf_counter()
    code = driver.run(study, out)
    wall = time.perf_counter() - t0
    if code != 0:
        sys.exit(f"study failed (exit {code})")
    from mlflow.tracking import MlflowClient

    records = StudyFolder(out).load()[1]
    client = MlflowClient(records.tracking_uri)
    runs = sorted(client.search_runs([records.experiment_id], filter_string="tags.`mlflow.parentRunId` != ''"),
                  key=lambda r: r.info.start_time)
    shares = [r.data.metrics["reporting_time_s"] / r.data.metrics["train_time_s"] for r in runs]
    artifacts = [r.data.metrics["artifacts_time_s"] for r in runs]
    outside = [(cur.info.end_time - prev.info.end_time) / 1000 - cur.data.metrics["train_time_s"]
               for prev, cur in zip(runs, runs[1:])]
    return wall, shares, artifacts, outside


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--loop", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    n = args.trials
    if args.loop:
        print(plain_loop(make_study(n, args.steps, args.eval_every, False, "loop")))
        return

    print("starting Ray (not timed) ...", file=sys.stderr)
    driver.connect(None)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        warm = make_study(2, 20, 10, True, "warmup")  # worker start-up and imports, not timed
        driver.run(warm, Path(tmp) / "warmup")
        loop_s = plain_loop_in_fresh_process(n, args.steps, args.eval_every)
        per_loop = loop_s / n
        rows.append(("plain loop of train()", per_loop, None, None, None, None, None))
        for artifacts in (False, True):
            walls = {}
            for size in (2, 2 + n):
                study = make_study(size, args.steps, args.eval_every, artifacts, f"bench{int(artifacts)}_{size}")
                walls[size], shares, art, outside = through_vqstudy(study, Path(tmp) / study.name)
            per_trial = (walls[2 + n] - walls[2]) / n
            rows.append((f"vqstudy, figures {'on' if artifacts else 'off'}", per_trial, statistics.median(outside),
                         per_trial - per_loop, statistics.mean(shares), statistics.mean(art), walls[2] - 2 * per_trial))

    evals = -(-args.steps // args.eval_every)
    print(f"\n{n} trials x {args.steps} steps ({evals} evaluations each), one at a time, 1 CPU thread, "
          f"{os.cpu_count()} cores\n")
    print("| runner | s / trial | overhead s / trial (in-run, median) | s / trial - loop | logging share of trial time "
          "| figures s / trial | fixed study start-up s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    fmt = lambda v, f, unit="": "-" if v is None else format(v, f) + unit  # noqa: E731
    for name, per_trial, outside, vs_loop, share, art, fixed in rows:
        print(f"| {name} | {per_trial:.3f} | {fmt(outside, '.3f')} | {fmt(vs_loop, '+.3f')} | "
              f"{fmt(share and 100 * share, '.2f', '%')} | {fmt(art, '.3f')} | {fmt(fixed, '.1f')} |")


if __name__ == "__main__":
    main()
