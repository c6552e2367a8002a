"""How the driver's cost grows with the number of trials: vqstudy vs a plain Ray Tune run of
the same trainable, same machine, same run.

Tiny trials (5 training steps, one evaluation), 2 at a time on a local Ray instance. For each
study size N and each runner (a fresh process each, so that peak memory is its own):
  - the gap between consecutive trial completions, averaged per quarter of the study: a
    driver whose cost grows with the study shows a last quarter slower than the first;
  - Ray's experiment state per trial (the newest experiment_state-*.json / N);
  - the driver's peak memory (ru_maxrss) and, for vqstudy, the MLflow store and ledger sizes;
  - "Tune floor": a trainable that reports one key once, no checkpoint: the state any Tune
    trial costs, whatever its runner does.
Targets (issue 11): last quarter within 1.5x the first at 5,000 trials; state < 2 KB/trial.

    python benchmarks/scale_bench.py [--sizes 100 1000 5000]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BASE = {"data": {"name": "gaussian_mixture", "num_train": 256, "num_eval": 128, "dim": 8, "num_components": 16},
        "model": {"latent_dim": 4, "encoder_width": 16, "decoder_width": 16},
        "quantizer": {"name": "vq", "codebook_size": 16},
        "train": {"steps": 5, "eval_every": 5, "batch_size": 32, "eval_batch_size": 128, "device": "cpu"}}


def quarters(times: list[float]) -> list[float]:
    """Mean gap (s) between consecutive completions in each quarter of the study."""
    times = sorted(times)
    gaps = [b - a for a, b in zip(times, times[1:])]
    q = max(1, len(gaps) // 4)
    return [statistics.mean(gaps[i * q:(i + 1) * q] or [float("nan")]) for i in range(4)]


def state_bytes(folder: Path) -> int:
    states = sorted(folder.glob("experiment_state-*.json"))
    return states[-1].stat().st_size if states else 0


def run_vqstudy(n: int, tmp: Path) -> dict:
    from vqstudy import driver
    from vqstudy.ledger import _lines
    from vqstudy.study import parse_study

    study = parse_study({"name": f"scale{n}", "base": BASE, "resources": {"cpu": 1},
                         "sweep": {"grid": {"data.root": [f"unused{i}" for i in range(n)]}},
                         "tracking": {"artifacts": False}})
    out = tmp / "study"
    driver.connect(None)
    t0 = time.time()
    with open(os.devnull, "w") as quiet:
        sys.stdout, sys.stderr = quiet, quiet
        code = driver.run(study, out)
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    ends = [r["t"] for r in _lines(out / "ledger.jsonl") if r.get("op") == "end"]
    return {"exit": code, "wall_s": time.time() - t0, "quarters": quarters(ends),
            "state_per_trial": state_bytes(out / "ray") / n, "mlflow_mb": (out / "mlflow.db").stat().st_size / 2**20,
            "ledger_mb": (out / "ledger.jsonl").stat().st_size / 2**20}


def _tune_only(trainable, name: str, space: dict, n: int, tmp: Path) -> dict:
    """A plain Ray Tune run of `trainable` over `space`, timing each trial's completion."""
    import ray
    from ray import tune

    ends: list[float] = []

    class Ends(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            ends.append(time.time())

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    t0 = time.time()
    tune.Tuner(tune.with_resources(trainable, {"cpu": 1}), param_space=space,
               tune_config=tune.TuneConfig(reuse_actors=True),
               run_config=tune.RunConfig(name=name, storage_path=str(tmp), callbacks=[Ends()], verbose=0)).fit()
    return {"exit": 0, "wall_s": time.time() - t0, "quarters": quarters(ends),
            "state_per_trial": state_bytes(tmp / name) / n}


def run_plain(n: int, tmp: Path) -> dict:
    """The same train() as vqstudy's trials, reporting every metric to Tune."""
    from ray import tune

    from vqstudy.config import TrialConfig
    from vqstudy.train import train

    def trainable(config):
        import torch

        torch.set_num_threads(1)
        train(TrialConfig.from_dict({**BASE, **config}), report=lambda m: tune.report(m))

    return _tune_only(trainable, "plain", {"data.root": tune.grid_search([f"unused{i}" for i in range(n)])}, n, tmp)


def run_floor(n: int, tmp: Path) -> dict:
    """Ray Tune's own floor: a trainable that reports one key once and never checkpoints."""
    from ray import tune

    def trainable(config):
        tune.report({"x": 1.0})

    return _tune_only(trainable, "floor", {"i": tune.grid_search(list(range(n)))}, n, tmp)


RUNNERS = {"vqstudy": run_vqstudy, "plain Ray Tune": run_plain, "Tune floor": run_floor}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 5000])
    p.add_argument("--cell", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")   # a throwaway local instance
    if args.cell:
        runner, n = args.cell[0], int(args.cell[1])
        with tempfile.TemporaryDirectory() as tmp:
            result = RUNNERS[runner](n, Path(tmp))
        result["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return
    print("| trials | runner | wall s | gap s Q1 | Q2 | Q3 | Q4 | Q4 / Q1 | state B / trial | driver peak MB | "
          "MLflow MB | ledger MB |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in args.sizes:
        for runner in RUNNERS:
            print(f"  {runner} x {n} ...", file=sys.stderr)
            out = subprocess.run([sys.executable, __file__, "--cell", runner, str(n)],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                print(f"| {n} | {runner} | error: {out.stderr.strip().splitlines()[-1][:100]} |")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            q = r["quarters"]
            extra = f"{r['mlflow_mb']:.1f} | {r['ledger_mb']:.2f}" if "mlflow_mb" in r else "- | -"
            print(f"| {n:,} | {runner} | {r['wall_s']:.0f} | " + " | ".join(f"{v:.3f}" for v in q) +
                  f" | {q[3] / q[0]:.2f} | {r['state_per_trial']:,.0f} | {r['peak_mb']:.0f} | {extra} |", flush=True)


if __name__ == "__main__":
    main()
