"""The GPU benchmark runs where there is no GPU: one line without CUDA, its tables on the CPU."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_bench.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_gpu_bench_without_cuda_says_so_and_exits_0():
    r = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().startswith("gpu_bench: no CUDA device here")
    assert len(r.stdout.strip().splitlines()) == 1


@pytest.mark.slow
def test_gpu_bench_tables_on_the_cpu():
    """--device cpu: the trial and quantizer tables, every cell measured (no error rows)."""
    r = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--variants", "fp32", "bf16",
                        "--trial-steps", "200", "--n", "256", "--ks", "512"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and not line.startswith("| -")]
    assert "error" not in r.stdout
    trial = [row for row in rows if row.startswith(("| fp32", "| bf16"))]
    quantizer = [row for row in rows if row.startswith("| 512 |")]
    assert len(trial) == 2 and float(trial[0].split("|")[2]) > 0
    assert [row.split("|")[2].strip() for row in quantizer] == ["floor", "vq", "simvq", "ema", "cvq", "ibq"]
