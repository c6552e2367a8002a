"""A resume that cannot lose or duplicate a trial: one study's driver is SIGKILLed at 20
random moments (seeded), resumed after each, then left to finish. The records must be exact:
one child run per grid point, closed finished with its last step; each evaluation logged
once; an export row per trial; no trial that ended ever started again; the audit passes."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from vqstudy.cli import main
from vqstudy.folder import RECORDS_FILE, StudyFolder
from vqstudy.ledger import replay

from .conftest import tiny_study

pytestmark = [pytest.mark.usefixtures("ray_address"), pytest.mark.slow]

KILLS = 20
SIZES = [4, 6, 8, 12, 16, 24, 32, 48, 64, 96]   # 10 trials of ~5 s: ~25 s of work on 2 CPUs


def _driver(args: list[str], address: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vqstudy.cli", *args, "--address", address],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _ended_then_started(ledger_path) -> list[str]:
    """Trials whose ledger shows a start after their end (a finished trial run again)."""
    ended, again = set(), []
    for line in ledger_path.read_text().splitlines():
        r = json.loads(line)
        if r["op"] == "end":
            ended.add(r["trial"])
        elif r["op"] == "start" and r["trial"] in ended:
            again.append(r["trial"])
    return again


def test_twenty_sigkills_leave_exact_records(tmp_path, ray_address, capsys):
    path = tiny_study(tmp_path, name="torture",
                      sweep={"grid": {"quantizer.codebook_size": SIZES}, "checkpoint_interval_s": 0.5},
                      base={"train": {"steps": 8000, "eval_every": 800, "device": "cpu"}})
    out = tmp_path / "out"
    rng = random.Random(11)
    moments = []
    for i in range(KILLS):
        args = ["resume", str(out)] if (out / RECORDS_FILE).exists() else ["run", str(path), "--out", str(out)]
        proc = _driver(args, ray_address)
        moment = rng.uniform(2.0, 12.0)  # trials start ~4 s in: kills land before, between and during commits
        time.sleep(moment)
        if proc.poll() is not None:      # it finished before the kill
            break
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        moments.append(round(moment, 1))
    assert len(moments) >= KILLS // 2, f"the study kept finishing before the kill: {moments}"
    capsys.readouterr()
    assert main(["resume", str(out)]) == 0, capsys.readouterr().err
    printed = capsys.readouterr()
    assert f"torture: {len(SIZES)} finished (of {len(SIZES)})" in printed.out and "audit" not in printed.err

    trials = replay(out / "ledger.jsonl")
    assert sorted(t.config["quantizer.codebook_size"] for t in trials.values()) == SIZES
    assert all(t.outcome == "finished" and t.last_step == 8000 for t in trials.values())
    assert _ended_then_started(out / "ledger.jsonl") == []
    assert any(t.restored_at for t in trials.values()), "no trial was resumed from a checkpoint"

    uri = StudyFolder(out).load()[1].tracking_uri
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("torture")
    children = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    assert Counter(r.data.tags["vqstudy.trial_id"] for r in children) == Counter({t: 1 for t in trials})
    for run in children:
        assert run.info.status == "FINISHED" and run.data.metrics["step"] == 8000
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "recon_mse")]
        assert sorted(steps) == list(range(800, 8001, 800)), (run.data.tags["vqstudy.trial_id"], steps, moments)
        assert len(client.get_metric_history(run.info.run_id, "reporting_time_s")) == 1   # the last step's, once

    assert main(["export", str(out)]) == 0
    table = pq.read_table(out / "results.parquet")
    assert table.num_rows == len(SIZES)
