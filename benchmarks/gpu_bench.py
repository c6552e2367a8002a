"""GPU figures, side by side in one run: the training loop, the quantizer step, and packing.

On the CUDA device it finds (the first one), three tables:
  1. trial: steps/s of a quickstart-sized trial (studies/quickstart.yaml's base, simvq at
     K = 1,024) in fp32, bf16, compiled, and bf16 + compiled, at steady state (between the
     second and the last evaluation: the first window holds warm-up and compilation), with
     the wall time of the whole trial and its peak GPU memory; ratios against fp32.
  2. quantizer: one training step of the quantizer alone (forward + backward) at N encoder
     outputs of D = 64 for each K, against the matmul+argmin floor and vector-quantize-pytorch's
     VectorQuantize and SimVQ at the same shapes, with peak GPU memory (each cell in a fresh
     process: quantizer_bench.py's cells). Targets (issue 13): vq within 1.5x the floor and
     >= 3x faster than the peer's VectorQuantize at K = 65,536; K = 262,144 under 4 GB.
  3. packing: a study of quickstart-sized trials at `resources.gpu` 1, 0.5 and 0.25 (one,
     two and four trials sharing the GPU), trials per GPU-hour and the ratio to one trial per
     GPU (target: >= 2.5x at 0.25). With --mps the packed runs are repeated under CUDA MPS
     (the bench starts and stops the control daemon; without MPS packed trials time-slice).

Without CUDA it says so in one line and exits 0. `--device cpu` runs tables 1 and 2 on the
CPU instead (the CPU figures of the loop in the README come from it; give small shapes).

    python benchmarks/gpu_bench.py [--parts trial quantizer packing] [--n 16384] [--ks 65536 262144]
        [--trial-steps 2000] [--study-steps 3000] [--fractions 1 0.5 0.25] [--mps] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from quantizer_bench import run_cell

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "studies" / "quickstart.yaml"
VARIANTS = {"fp32": {}, "bf16": {"train.precision": "bf16"}, "compiled": {"train.compile": True},
            "bf16+compiled": {"train.precision": "bf16", "train.compile": True}}
QUANTIZER_METHODS = ["floor", "vq", "peer:vq", "simvq", "peer:simvq", "ema", "cvq", "ibq"]


# -- cells, each run in a fresh process -----------------------------------------------------
def trial_cell(variant: str, steps: int, device: str) -> dict:
    """One quickstart-sized trial; steady steps/s from the step times between evaluations."""
    import torch

    from vqstudy.study import load_study
    from vqstudy.train import train

    torch.set_num_threads(1)   # as a trial of resources.cpu: 1
    base = load_study(QUICKSTART).base
    cfg = base.updated({"quantizer.name": "simvq", "quantizer.codebook_size": 1024, "train.steps": steps,
                        "train.eval_every": max(1, steps // 4), "train.device": device, **VARIANTS[variant]})
    marks: list[dict] = []
    t0 = time.perf_counter()
    train(cfg, report=marks.append)
    wall = time.perf_counter() - t0
    step_time = [m["step"] * cfg.train.batch_size / m["samples_per_s"] for m in marks]   # cumulative s
    steady = (marks[-1]["step"] - marks[1]["step"]) / (step_time[-1] - step_time[1])
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    return {"steps_per_s": steady, "wall_s": wall, "first_window_s": step_time[0], "peak_mb": peak,
            "recon_mse": marks[-1]["recon_mse"], "utilization": marks[-1]["utilization"]}


def packing_cell(gpu: float, steps: int, out: str) -> dict:
    """The quickstart study at `gpu` GPUs per trial; its wall time (Ray started before the clock)."""
    from vqstudy import driver
    from vqstudy.connection import connect
    from vqstudy.fields import load_yaml
    from vqstudy.study import parse_study

    raw = load_yaml(QUICKSTART)
    raw["name"] = f"gpu-bench-{str(gpu).replace('.', '_')}"
    raw["base"]["train"].update(steps=steps, eval_every=max(1, steps // 3), device="auto")
    raw["resources"] = {"cpu": 1, "gpu": gpu}
    raw.setdefault("tracking", {})["artifacts"] = False
    study = parse_study(raw, QUICKSTART)
    connect(None)
    t0 = time.perf_counter()
    code = driver.run(study, Path(out))
    return {"wall_s": time.perf_counter() - t0, "trials": study.num_trials, "exit": code}


def run_in_process(args: list[str], env: dict | None = None) -> dict:
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1][:80]}
    return json.loads(r.stdout.strip().splitlines()[-1])


# -- tables -----------------------------------------------------------------------------------
def fmt(v, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def trial_table(args, env) -> None:
    rows = {}
    for variant in args.variants:
        print(f"  trial {variant} ...", file=sys.stderr, flush=True)
        rows[variant] = run_in_process(["--trial-cell", variant, "--trial-steps", str(args.trial_steps),
                                        "--device", args.device], env)
    base = rows.get("fp32", {}).get("steps_per_s")
    print(f"\n### Trial: quickstart-sized (simvq, K = 1,024, batch 256), {args.trial_steps} steps\n")
    print("| variant | steps/s (steady) | x fp32 | trial wall s | first window s | peak MB | recon_mse | utilization |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for variant, c in rows.items():
        if "error" in c:
            print(f"| {variant} | error: {c['error']} | | | | | | |")
            continue
        ratio = fmt(c["steps_per_s"] / base, ".2f") if base else "-"
        print(f"| {variant} | {c['steps_per_s']:.0f} | {ratio} | {c['wall_s']:.1f} | {c['first_window_s']:.1f} | "
              f"{fmt(c['peak_mb'], '.0f')} | {c['recon_mse']:.4f} | {c['utilization']:.3f} |")


def quantizer_table(args, env) -> None:
    print(f"\n### Quantizer step: N = {args.n:,}, D = 64 (forward + backward; median of 3)\n")
    print("| K | method | ms | x floor | peer ms | peer / ours (speed-up) | peak MB |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for k in args.ks:
        cells = {}
        for m in QUANTIZER_METHODS:
            print(f"  quantizer {m} K={k} ...", file=sys.stderr, flush=True)
            cells[m] = run_cell(m, args.n, 64, k, 3, env=env)
        floor = cells["floor"].get("ms")
        for m, c in cells.items():
            if m.startswith("peer:"):
                continue
            if "error" in c:
                print(f"| {k:,} | {m} | error: {c['error']} | | | | |")
                continue
            peer = cells.get(f"peer:{m}", {})
            peer_ms = peer.get("ms")
            print(f"| {k:,} | {m} | {c['ms']:.1f} | {fmt(c['ms'] / floor if floor else None, '.2f')} | "
                  f"{fmt(peer_ms) if 'error' not in peer else 'error'} | "
                  f"{fmt(peer_ms / c['ms'] if peer_ms else None, '.2f')} | {c['peak_mb']:.0f} |")


def packing_table(args, env) -> None:
    results = []
    for mps in ([False, True] if args.mps else [False]):
        daemon = start_mps(env) if mps else None
        try:
            for g in args.fractions:
                print(f"  packing gpu={g}{' (MPS)' if mps else ''} ...", file=sys.stderr, flush=True)
                out = tempfile.mkdtemp(prefix="gpu-bench-")
                c = run_in_process(["--packing-cell", str(g), "--study-steps", str(args.study_steps), "--out", out],
                                   daemon or env)
                shutil.rmtree(out, ignore_errors=True)
                results.append((g, mps, c))
        finally:
            if daemon:
                stop_mps(daemon)
    per_hour = {(g, m): 3600 * c["trials"] / c["wall_s"] for g, m, c in results if "error" not in c}
    print(f"\n### Packing: quickstart study ({results[0][2].get('trials', '?')} trials of {args.study_steps} steps), "
          "one GPU\n")
    print("| resources.gpu | MPS | trials at once | study wall s | trials / GPU-hour | x gpu 1 |")
    print("|---:|---|---:|---:|---:|---:|")
    for g, mps, c in results:
        if "error" in c:
            print(f"| {g:g} | {'yes' if mps else 'no'} | | error: {c['error']} | | |")
            continue
        one = per_hour.get((1.0, False))
        print(f"| {g:g} | {'yes' if mps else 'no'} | {int(1 / g)} | {c['wall_s']:.1f} | {per_hour[(g, mps)]:.0f} | "
              f"{fmt(per_hour[(g, mps)] / one if one else None, '.2f')} |")


def start_mps(env: dict | None) -> dict:
    """Start an MPS control daemon with its own pipe and log folders; the env trials must inherit."""
    mps_env = dict(env or os.environ)
    root = Path(tempfile.mkdtemp(prefix="mps-"))
    mps_env.update(CUDA_MPS_PIPE_DIRECTORY=str(root / "pipe"), CUDA_MPS_LOG_DIRECTORY=str(root / "log"))
    for d in ("pipe", "log"):
        (root / d).mkdir()
    subprocess.run(["nvidia-cuda-mps-control", "-d"], env=mps_env, check=True)
    return mps_env


def stop_mps(mps_env: dict) -> None:
    subprocess.run(["nvidia-cuda-mps-control"], input="quit\n", text=True, env=mps_env, check=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", nargs="+", default=["trial", "quantizer", "packing"],
                   choices=["trial", "quantizer", "packing"])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--trial-steps", type=int, default=2000)
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--ks", type=int, nargs="+", default=[65536, 262144])
    p.add_argument("--study-steps", type=int, default=3000)
    p.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    p.add_argument("--mps", action="store_true", help="also run the packed studies under CUDA MPS")
    p.add_argument("--trial-cell", help=argparse.SUPPRESS)
    p.add_argument("--packing-cell", type=float, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.trial_cell:
        print(json.dumps(trial_cell(args.trial_cell, args.trial_steps, args.device)))
        return
    if args.packing_cell is not None:
        print(json.dumps(packing_cell(args.packing_cell, args.study_steps, args.out)))
        return

    import torch

    env = None
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print(f"gpu_bench: no CUDA device here (torch {torch.__version__}); nothing measured")
            return
        print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    else:
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}   # the quantizer cells pick CUDA when they see it
        args.parts = [part for part in args.parts if part != "packing"]
        print(f"device: cpu ({os.cpu_count()} cores, trials on 1 thread), torch {torch.__version__}, "
              f"{time.strftime('%Y-%m-%d')}")
    for part in args.parts:
        {"trial": trial_table, "quantizer": quantizer_table, "packing": packing_table}[part](args, env)


if __name__ == "__main__":
    main()
