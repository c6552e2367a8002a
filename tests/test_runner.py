"""Studies on a real local Ray instance with a real MLflow SQLite store: end to end,
divergence, Optuna search, ASHA, a killed driver resumed, a killed trial retried."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient

from vqstudy import driver
from vqstudy.cli import main
from vqstudy.folder import RAY_DIR, RECORDS_FILE, STUDY_FILE, StudyFolder
from vqstudy.outcome import Outcome
from vqstudy.study import load_study
from vqstudy.tables import sweep_summary
from vqstudy.train import train

from .conftest import tiny_study

pytestmark = [pytest.mark.usefixtures("ray_address"), pytest.mark.slow]


def mlflow_runs(out_dir, experiment: str):
    """(parent runs, child runs) of a study folder's MLflow store."""
    client = MlflowClient(StudyFolder(out_dir).load()[1].tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def test_two_trials_end_to_end(tmp_path, capsys):
    """A two-trial study: exit 0, a table, one parent run with two nested FINISHED children
    carrying the flattened config as params, a metric per evaluation, tags and artifacts."""
    path = tiny_study(tmp_path, tracking={"artifacts": True})
    study = load_study(path)
    out = tmp_path / "out"
    assert driver.run(study, out) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "tiny: 2 finished (of 2)" in printed and "finished" in printed.splitlines()[1]
    err = captured.err.splitlines()      # progress: a first line at once, a line per start and end
    assert err[0].startswith("tiny: 2 trials into") and err[0].endswith("starting Ray...")
    progress = [line for line in err if line.startswith("[")]
    assert sum(" started " in line for line in progress) == 2 and sum(" finished " in line for line in progress) == 2
    assert progress[-1].startswith("[2/2]") and progress[-1].endswith("(0 running, 0 pending)")

    client, parents, children = mlflow_runs(out, "tiny")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 2
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    for child in children:
        assert child.info.status == "FINISHED"
        cfg = study.trial_config({"quantizer.name": child.data.params["quantizer.name"], "train.seed": 0})
        assert child.data.params == {k: str(v) for k, v in cfg.to_flat().items()}
        history = client.get_metric_history(child.info.run_id, "recon_mse")
        assert [m.step for m in history] == [10, 20, 30]
        assert child.data.tags["vqstudy.study"] == "tiny" and child.data.tags["vqstudy.trial_id"]
        assert [a.path for a in client.list_artifacts(child.info.run_id)] == ["code_usage.png"]
    assert main(["status", str(out)]) == 0

    # what a person sees in the MLflow UI: runs named by what varies, a described parent
    assert sorted(c.info.run_name for c in children) == ["simvq seed=0", "vq seed=0"]
    parent, experiment = parents[0], client.get_experiment_by_name("tiny")
    assert parent.data.tags["mlflow.note.content"].endswith(sweep_summary(study))
    assert parent.data.tags["vqstudy.sweep"] == "quantizer.name (vq, simvq) x 1 seed: 2 trials, 60 steps"
    assert [a.path for a in client.list_artifacts(parent.info.run_id)] == ["study.yaml"]
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    link = f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning"
    assert link in printed
    # a run's start and end are its trial's (the ledger's times), not those of the batched write
    from vqstudy.ledger import replay
    records = replay(out / "ledger.jsonl")
    for child in children:
        record = records[child.data.tags["vqstudy.trial_id"]]
        assert abs(child.info.start_time - record.started_at * 1000) <= 1     # the ledger keeps ms
        assert abs(child.info.end_time - record.ended_at * 1000) <= 1


def test_existing_folder_is_refused(tmp_path):
    """Running into a folder that already holds a study points to resume instead."""
    from vqstudy.config import ConfigError

    out = tmp_path / "out"
    (out / RAY_DIR).mkdir(parents=True)
    with pytest.raises(ConfigError, match="vqstudy resume"):
        driver.run(load_study(tiny_study(tmp_path)), out)


def test_diverging_trial_fails_alone(tmp_path, capsys):
    """A diverging trial ends FAILED in MLflow with its reason; the other finishes; exit code 1."""
    path = tiny_study(tmp_path, sweep={"grid": {"train.lr": [1e-3, 1e6]}},
                      base={"train": {"steps": 30, "eval_every": 1, "device": "cpu"}})
    out = tmp_path / "out"
    assert driver.run(load_study(path), out) == 1
    printed = capsys.readouterr()
    assert "diverged" in printed.out
    ended = [line for line in printed.err.splitlines() if " diverged " in line]
    assert len(ended) == 1 and "lr=1e+06 seed=0" in ended[0] and "-- loss became" in ended[0]   # why, in the line
    _, _, children = mlflow_runs(out, "tiny")
    status = {c.data.params["train.lr"]: c for c in children}
    assert status["0.001"].info.status == "FINISHED"
    assert status["1000000.0"].info.status == "FAILED"
    assert status["1000000.0"].data.tags["vqstudy.outcome"] == "diverged"
    assert status["1000000.0"].data.tags["vqstudy.failure"].startswith("loss became")
    assert main(["export", str(out)]) == 0   # the reason and the last step reached reach the table
    rows = {r["train.lr"]: r for r in pq.read_table(out / "results.parquet").to_pylist()}
    assert rows[1e6]["status"] == "diverged" and rows[1e6]["failure_reason"].startswith("loss became")
    assert rows[1e6]["steps"] >= 1 and rows[1e-3]["failure_reason"] is None


def test_optuna_search_per_grid_point(tmp_path):
    """Optuna (multi-objective NSGA-II) proposes num_samples configs per grid point, within bounds."""
    path = tiny_study(tmp_path, sweep={
        "grid": {"quantizer.name": ["vq"]},
        "search": {"algorithm": "optuna", "sampler": "nsga2", "num_samples": 3,
                   "train.lr": {"loguniform": [1e-4, 1e-2]}, "quantizer.beta": {"uniform": [0.1, 0.5]}},
        "metric": ["recon_mse", "utilization"], "mode": ["min", "max"]})
    out = tmp_path / "out"
    assert driver.run(load_study(path), out) == 0
    _, _, children = mlflow_runs(out, "tiny")
    lrs = [float(c.data.params["train.lr"]) for c in children]
    betas = [float(c.data.params["quantizer.beta"]) for c in children]
    assert len(children) == 3 and len(set(lrs)) == 3
    assert all(1e-4 <= lr <= 1e-2 for lr in lrs) and all(0.1 <= b <= 0.5 for b in betas)


def test_asha_stops_weak_trials(tmp_path):
    """ASHA (grace 1 evaluation, factor 2) stops trials whose lr is hopeless before their last step."""
    path = tiny_study(tmp_path, sweep={"grid": {"train.lr": [3e-3, 1e-3, 1e-7, 1e-8]},
                                       "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2}},
                      base={"train": {"steps": 40, "eval_every": 10, "device": "cpu"}},
                      resources={"cpu": 1, "max_concurrent": 1})
    out = tmp_path / "out"
    driver.run(load_study(path), out)
    rows = {r["train.lr"]: r for r in StudyFolder(out).trial_rows(load_study(path))}
    assert rows[3e-3]["step"] == 40
    assert rows[1e-7]["step"] < 40 and rows[1e-8]["step"] < 40
    assert rows[3e-3]["outcome"] is Outcome.FINISHED and rows[1e-7]["outcome"] is Outcome.STOPPED_EARLY
    # stopped trials are closed in MLflow too, marked with the step where they stopped
    _, _, children = mlflow_runs(out, "tiny")
    assert all(c.info.status == "FINISHED" for c in children)
    stopped = {float(c.data.params["train.lr"]): c.data.tags.get("vqstudy.stopped_early_at_step") for c in children}
    assert stopped[3e-3] is None and stopped[1e-7] == str(rows[1e-7]["step"])


def _driver(study_path, out, address):
    return subprocess.Popen([sys.executable, "-m", "vqstudy.cli", "run", str(study_path), "--out", str(out),
                             "--address", address], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _wait_for(predicate, timeout: float, what: str, poll: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(poll)
    pytest.fail(f"timed out waiting for {what}")


def _children_with(out, status: str) -> int:
    if not (out / RECORDS_FILE).exists():
        return 0
    try:
        _, _, children = mlflow_runs(out, "resumable")
    except Exception:  # the store is still being created
        return 0
    return sum(c.info.status == status for c in children)


def test_killed_driver_then_resume(tmp_path, ray_address):
    """The driver is SIGKILLed mid-study; `resume` finishes it with exactly one FINISHED child run per trial."""
    sizes = [8, 16, 32, 64, 128, 256]  # enough work that the kill lands mid-study even on a loaded machine:
    path = tiny_study(tmp_path, name="resumable", sweep={"grid": {"quantizer.codebook_size": sizes}},   # ~2 s a trial
                      base={"train": {"steps": 2000, "eval_every": 200, "device": "cpu"}})
    out = tmp_path / "out"
    proc = _driver(path, out, ray_address)
    _wait_for(lambda: _children_with(out, "FINISHED") >= 1, 120, "a finished trial")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _children_with(out, "FINISHED") < len(sizes)

    assert driver.resume(out, ray_address) == 0
    _, parents, children = mlflow_runs(out, "resumable")
    assert len(parents) == 1 and len(children) == len(sizes)
    assert all(c.info.status == "FINISHED" for c in children)
    assert len({c.data.tags["vqstudy.trial_id"] for c in children}) == len(sizes)


def test_resume_refuses_a_legacy_state_cut_short(tmp_path, capsys):
    """A folder from before commits (no ray-state/) whose Ray state a driver killed mid-write
    left empty: resume says so in one line (exit 2) instead of resuming part of the study."""
    out = tmp_path / "out"
    (out / RAY_DIR).mkdir(parents=True)
    (out / STUDY_FILE).write_text("name: cut\n")
    (out / RECORDS_FILE).write_text(json.dumps({"tracking_uri": "sqlite:///x", "experiment_id": "1",
                                                     "parent_run_id": "p", "study_path": None}))
    (out / "ledger.jsonl").write_text('{"op":"start","trial":"a","name":"a","config":{}}\n')
    (out / RAY_DIR / "experiment_state-2026-01-01_00-00-00.json").write_text("")
    assert main(["resume", str(out)]) == 2
    assert "Ray's experiment state is empty or cut short" in capsys.readouterr().err


def _trial_pids(out: Path) -> list[int]:
    """Ray workers running a trial of the study in `out`: Tune chdirs a trial's worker into a
    staging folder named like the trial's folder (other tests' idle reused workers sit elsewhere)."""
    trials = {p.name for p in (out / RAY_DIR).glob("trial_*")}
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if f.read().startswith(b"ray::ImplicitFunc") and Path(os.readlink(f"/proc/{entry}/cwd")).name in trials:
                    pids.append(int(entry))
        except (OSError, ValueError):
            continue
    return pids


def test_killed_trial_is_retried_from_checkpoint(tmp_path, ray_address):
    """A trial's worker is SIGKILLed after a checkpoint; Tune retries it from that checkpoint
    and it ends with the same metrics as an uninterrupted train() of the same config."""
    path = tiny_study(tmp_path, name="retry", sweep={"grid": {"quantizer.name": ["ema"]}},
                      base={"train": {"steps": 2000, "eval_every": 50, "device": "cpu"},
                            "quantizer": {"codebook_size": 16, "dead_code_threshold": 0.5}})
    out = tmp_path / "out"
    proc = _driver(path, out, ray_address)

    def checkpoint_seen() -> bool:
        """The trial has persisted its first checkpoint (step 50) into the storage."""
        return any(p.is_file() for p in (out / RAY_DIR).glob("trial_*/checkpoint_000000/*"))
    # The first checkpoint is persisted at step 50, the next 10 s later or at step 2000: kill
    # the worker once Tune has had a moment to register it, while the trial is surely mid-run.
    _wait_for(lambda: checkpoint_seen() and _trial_pids(out), 120, "a checkpoint", poll=0.05)
    time.sleep(0.3)
    for pid in _trial_pids(out):
        os.kill(pid, signal.SIGKILL)
    assert proc.wait(timeout=240) == 0

    study = load_study(path)
    client, _, children = mlflow_runs(out, "retry")
    assert len(children) == 1 and children[0].info.status == "FINISHED"
    recorded = children[0].data.metrics
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the trial ran with resources.cpu = 1 thread
    try:
        expected = train(study.trial_config(study.points()[0]))
    finally:
        torch.set_num_threads(threads)
    for key in ("recon_mse", "utilization", "perplexity", "quant_error", "dead_codes"):
        assert recorded[key] == expected[key], key
    # It was a resume, not a rerun from scratch: Ray counted the crash and the run records the
    # step it continued from; MLflow holds each evaluation exactly once.
    (row,) = StudyFolder(out).trial_rows(study)
    assert (row["failures"], row["outcome"]) == (1, Outcome.FINISHED)
    assert 50 <= int(children[0].data.tags["vqstudy.restored_at_step"]) < 2000
    steps = [m.step for m in client.get_metric_history(children[0].info.run_id, "recon_mse")]
    assert sorted(steps) == list(range(50, 2001, 50))
    # The driver's ledger holds every report it received: a rerun from scratch would report
    # step 50 again (a retry from the step-50 checkpoint may repeat later steps, never step 50).
    from vqstudy.ledger import replay

    reported = [r["step"] for r in replay(out / "ledger.jsonl")[row["trial_id"]].results]
    assert reported.count(50) == 1 and reported[-1] == 2000


def test_cluster_without_gpus_refuses_a_gpu_study(tmp_path, capsys, ray_address):
    """Joining a cluster that has no GPUs with a GPU study: exit 2 before any trial."""
    path = tiny_study(tmp_path, resources={"cpu": 1, "gpu": 1})
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--address", ray_address]) == 2
    assert "resources.gpu: 1 asked but the largest node of the Ray cluster has 0 GPUs" in capsys.readouterr().err


def _listening_ray_sockets() -> list[str]:
    """Local addresses of listening TCP sockets owned by Ray processes (from `ss -ltnp`)."""
    lines = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout.splitlines()
    names = ("raylet", "gcs_server", "ray::", "dashboard", "RuntimeEnv")
    return [line.split()[3] for line in lines if any(n in line for n in names)]


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2) to list sockets")
def test_local_instance_listens_on_loopback_only(tmp_path):
    """`vqstudy run` without an address starts its own Ray instance: nothing it opens listens
    beyond loopback."""
    path = tiny_study(tmp_path, name="loopback", base={"train": {"steps": 3000, "eval_every": 500, "device": "cpu"}})
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    proc = subprocess.Popen([sys.executable, "-m", "vqstudy.cli", "run", str(path), "--out", str(tmp_path / "out")],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for(lambda: _children_with_any(tmp_path / "out", "loopback"), 120, "a running trial")
        sockets = _listening_ray_sockets()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert sockets
    loopback = ("127.0.0.1:", "[::ffff:127.0.0.1]:", "[::1]:", "localhost:")
    assert all(s.startswith(loopback) for s in sockets), sockets


def _children_with_any(out, experiment: str) -> bool:
    if not (out / RECORDS_FILE).exists():
        return False
    try:
        return bool(mlflow_runs(out, experiment)[2])
    except Exception:  # the store is still being created
        return False


def test_run_with_analyze_logs_report_to_parent(tmp_path, capsys):
    """`vqstudy run --analyze`: results.parquet, fit table, PNG/SVG figures and report.md/html
    are written and appear on the MLflow parent run."""
    path = tiny_study(tmp_path, name="curves", sweep={"grid": {"quantizer.name": ["vq", "simvq"],
                                                               "quantizer.codebook_size": [4, 16, 64]}})
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out), "--analyze"]) == 0
    analysis = out / "analysis"
    for name in ("fits.csv", "report.md", "report.html", "utilization_vs_K.png", "utilization_vs_K.svg",
                 "recon_mse_vs_K.png", "recon_mse_vs_K.svg"):
        assert (analysis / name).stat().st_size > 0, name
    assert pq.read_table(out / "results.parquet").num_rows == 6
    assert len((analysis / "fits.csv").read_text().splitlines()) == 1 + 4   # 2 quantizers x 2 metrics
    client, parents, _ = mlflow_runs(out, "curves")
    logged = {a.path for a in client.list_artifacts(parents[0].info.run_id, "analysis")}
    assert {"analysis/report.html", "analysis/fits.csv", "analysis/results.parquet",
            "analysis/utilization_vs_K.png"} <= logged


def test_resume_recovers_from_a_cut_short_state_and_an_uncommitted_tail(tmp_path, capsys):
    """Ray's state in the storage cut short, and ledger records written after the last commit
    (a trial the state never knew): resume puts the committed state back, sets the tail aside,
    re-runs nothing and ends with the audit passing."""
    out = tmp_path / "out"
    assert driver.run(load_study(tiny_study(tmp_path)), out) == 0
    (state,) = (out / RAY_DIR).glob("experiment_state-*.json")
    state.write_text(state.read_text()[:100])
    with open(out / "ledger.jsonl", "a") as f:
        f.write('{"op":"start","trial":"feedbeef","name":"run_trial_feedbeef","config":{}}\n')
    capsys.readouterr()
    assert main(["resume", str(out)]) == 0
    printed = capsys.readouterr()
    assert "tiny: 2 finished (of 2)" in printed.out and "audit" not in printed.err
    assert json.loads(state.read_text())["trial_data"]
    assert len(list(out.glob("ledger.rolledback-*.jsonl"))) == 1
    starts = [line for line in (out / "ledger.jsonl").read_text().splitlines() if '"op":"start"' in line]
    assert len(starts) == 2 and "feedbeef" not in "".join(starts)
    _, _, children = mlflow_runs(out, "tiny")
    assert len(children) == 2


def test_a_driver_killed_before_its_first_commit_starts_again(tmp_path, ray_address, capsys):
    """Killed as soon as the folder exists, before Tune first saved its state: nothing was
    committed, so resume starts the study again under the same parent run, and says so."""
    out = tmp_path / "out"
    proc = _driver(tiny_study(tmp_path, name="early"), out, ray_address)
    _wait_for(lambda: (out / RECORDS_FILE).exists(), 120, "the study folder", poll=0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "ray-state" / "committed.json").exists()
    capsys.readouterr()
    assert main(["resume", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "nothing was committed before the driver stopped; starting the study again" in printed
    assert "early: 2 finished (of 2)" in printed
    _, parents, children = mlflow_runs(out, "early")
    assert len(parents) == 1 and len(children) == 2


def _stopped_by(sig: int, args: list[str], out: Path, ray_address: str, times: int = 1) -> subprocess.CompletedProcess:
    """Start a driver, send it `sig` (`times` times) once a trial has started (committed), collect its exit."""
    ledger = out / "ledger.jsonl"
    seen = ledger.read_text().count('"op":"start"') if ledger.exists() else 0
    proc = subprocess.Popen([sys.executable, "-m", "vqstudy.cli", *args, "--address", ray_address],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for(lambda: ledger.exists() and ledger.read_text().count('"op":"start"') > seen, 120, "a trial", poll=0.1)
    for _ in range(times):
        proc.send_signal(sig)
        time.sleep(0.3)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_sigterm_and_sigint_interrupt_cleanly(tmp_path, ray_address, capsys):
    """What a scheduler sends (SIGTERM) and Ctrl-C (SIGINT) stop the study cleanly: exit
    143 / 130, one line naming `vqstudy resume DIR`, no traceback, the parent run KILLED and
    no run left RUNNING; a second Ctrl-C stops at once; resume then finishes every trial once."""
    path = tiny_study(tmp_path, name="stopped", base={"train": {"steps": 6000, "eval_every": 1000, "device": "cpu"}})
    out = tmp_path / "out"
    for sig, code, args in [(signal.SIGTERM, 143, ["run", str(path), "--out", str(out)]),
                            (signal.SIGINT, 130, ["resume", str(out)])]:
        r = _stopped_by(sig, args, out, ray_address)
        assert r.returncode == code, r.stderr[-2000:]
        assert f"continue with: vqstudy resume {out}" in r.stderr
        assert "Traceback" not in r.stderr and "Tuner.restore" not in r.stderr
        _, (parent,), children = mlflow_runs(out, "stopped")
        assert parent.info.status == "KILLED" and all(c.info.status != "RUNNING" for c in children)
    r = _stopped_by(signal.SIGINT, ["resume", str(out)], out, ray_address, times=2)   # Ctrl-C twice: at once
    assert r.returncode == 130 and f"stopped at once — continue with: vqstudy resume {out}" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    capsys.readouterr()
    assert driver.resume(out, ray_address) == 0
    progress = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[")]
    assert progress and progress[-1].startswith("[2/2]") and "utilization=" in progress[-1]   # counts across resumes
    _, (parent,), children = mlflow_runs(out, "stopped")
    assert parent.info.status == "FINISHED" and len(children) == 2
    assert all(c.info.status == "FINISHED" for c in children)
    assert main(["export", str(out)]) == 0   # runtime_s: time spent running, not the stops between attempts
    wall = {c.data.tags["vqstudy.trial_id"]: (c.info.end_time - c.info.start_time) / 1000 for c in children}
    for row in pq.read_table(out / "results.parquet").to_pylist():
        assert 0 < row["runtime_s"] < wall[row["trial_id"]]


def test_failure_reason_is_the_trials_own_exception():
    """A failed trial's reason names what the trial raised, not Ray's RayTaskError around it."""
    from ray.exceptions import RayTaskError

    from vqstudy.progress import failure_reason

    try:
        raise ValueError("data.root: /nope has no MNIST\nsecond line: the real reason")
    except ValueError as e:
        wrapped = RayTaskError("train", "Traceback ...", e)
    assert failure_reason(wrapped) == "ValueError: second line: the real reason"
    assert failure_reason(None) == "failed"
