"""A study folder nothing overwrites or crosses: --out that would overwrite, a tracking URI
that is not one or carries a password, two drivers on one folder, a folder moved or copied."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from vqstudy import driver
from vqstudy.cli import main
from vqstudy.folder import RECORDS_FILE, StudyFolder
from vqstudy.study import load_study

from .conftest import error_line, tiny_study


def _refused(args: list[str], capsys) -> str:
    """Exit 2 and one error line (after, at most, the run's own first line: 'starting Ray...')."""
    assert main(args) == 2
    return error_line(capsys.readouterr().err)


def test_out_that_would_overwrite_is_refused(tmp_path, capsys):
    """A file, or a folder holding something that is not a study: refused, nothing touched."""
    path = tiny_study(tmp_path)
    (tmp_path / "afile").write_text("mine")
    assert "is a file" in _refused(["run", str(path), "--out", str(tmp_path / "afile")], capsys)
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "study.yaml").write_text("# my hand-written study, with comments\nname: x\n")
    assert "is not empty and holds no study" in _refused(["run", str(path), "--out", str(mine)], capsys)
    assert (mine / "study.yaml").read_text().startswith("# my hand-written study")
    assert sorted(p.name for p in mine.iterdir()) == ["study.yaml"]


@pytest.mark.parametrize("uri, message", [
    ("foo://bar", "is not an MLflow tracking URI"),
    ("http://me:secret@127.0.0.1:5000", "carries a password"),
    ("postgresql://mlflow:secret@db/mlflow", "carries a password"),
])
def test_tracking_uri_is_checked_before_anything_is_written(tmp_path, capsys, uri, message):
    err = _refused(["run", str(tiny_study(tmp_path)), "--out", str(tmp_path / "out"), "--tracking-uri", uri], capsys)
    assert message in err and "secret" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_second_driver_on_a_running_study_is_refused(tmp_path, ray_address, capsys):
    """While one driver runs a study, `run` into the same folder and `resume` of it are refused
    (exit 2, one line; resume names the holder's pid and start time); the first is unharmed."""
    path = tiny_study(tmp_path, name="busy", base={"train": {"steps": 3000, "eval_every": 1000, "device": "cpu"}})
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, "-m", "vqstudy.cli", "run", str(path), "--out", str(out), "--address",
                              ray_address], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / RECORDS_FILE).exists():
        assert time.time() < deadline and first.poll() is None, "the first driver never wrote its records"
        time.sleep(0.1)
    assert "already holds a study" in _refused(["run", str(path), "--out", str(out)], capsys)
    err = _refused(["resume", str(out)], capsys)
    assert f"another vqstudy driver is writing this study (pid {first.pid}, started " in err
    assert first.wait(timeout=180) == 0, first.stderr.read()[-2000:]


@pytest.mark.slow
def test_a_moved_or_copied_folder_keeps_its_own_records(tmp_path, ray_address, capsys):
    """A copy's resume writes into the copy's store and artifact folder, never the original's;
    after `mv`, status, export and resume work and nothing is written at the old place."""
    study = load_study(tiny_study(tmp_path, name="moved", tracking={"artifacts": True}))
    first = tmp_path / "first"
    assert driver.run(study, first) == 0
    assert json.loads((first / RECORDS_FILE).read_text())["tracking_uri"] is None   # "the mlflow.db beside me"
    copy = tmp_path / "copy"
    shutil.copytree(first, copy)
    before = {p: p.stat().st_mtime_ns for p in first.rglob("*")}
    assert main(["resume", str(copy)]) == 0
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*")} == before   # the original untouched
    client = MlflowClient(StudyFolder(copy).load()[1].tracking_uri)
    exp = client.get_experiment_by_name("moved")
    assert exp.artifact_location == (copy / "mlartifacts").resolve().as_uri()
    runs = client.search_runs([exp.experiment_id])
    assert all(run.info.artifact_uri.startswith(exp.artifact_location + "/") for run in runs)
    child = next(r for r in runs if "mlflow.parentRunId" in r.data.tags)
    assert [a.path for a in client.list_artifacts(child.info.run_id)] == ["code_usage.png"]

    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(first, moved)
    capsys.readouterr()
    assert main(["status", str(moved)]) == 0
    assert main(["export", str(moved)]) == 0 and "2 trials" in capsys.readouterr().out
    assert main(["resume", str(moved)]) == 0
    assert not first.exists()   # nothing written at the old place


@pytest.mark.parametrize("address", ["127.0.0.1:1", "nohost.invalid:6379"])
def test_an_unreachable_address_is_one_line_within_seconds(tmp_path, capsys, address):
    t0 = time.time()
    err = _refused(["run", str(tiny_study(tmp_path)), "--out", str(tmp_path / "out"), "--address", address], capsys)
    assert f"cannot reach the Ray cluster at {address!r}" in err and time.time() - t0 < 30
    assert not (tmp_path / "out").exists()


def test_values_that_would_fail_inside_ray_are_refused_before(tmp_path, capsys):
    """A grid too large (said by its size, not expanded) and a CUDA device without a GPU."""
    huge = tiny_study(tmp_path, name="huge", sweep={"grid": {"train.seed": list(range(1000)),
                                                             "quantizer.codebook_size": list(range(2, 1002))}})
    t0 = time.time()
    err = _refused(["run", str(huge), "--dry-run"], capsys)
    assert "sweep.grid: 1,000,000 points (1,000 x 1,000 x 1, repeats last)" in err and time.time() - t0 < 10
    cuda = tiny_study(tmp_path, name="cuda", base={"train": {"device": "cuda"}})
    assert "train.device: cuda but resources.gpu is 0" in _refused(["run", str(cuda), "--dry-run"], capsys)


def test_export_to_a_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "outdir").mkdir()
    code = main(["export", "--run", "x", "--tracking-uri", StudyFolder(tmp_path).default_tracking_uri,
                 "-o", str(tmp_path / "outdir")])
    assert code == 2 and "is a folder; give a file name" in capsys.readouterr().err


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_the_study_resumes(tmp_path, ray_address):
    """The study folder on a small tmpfs that fills up mid-study: exit 1, lines naming the
    full device and no traceback; once there is room, resume finishes every trial and closes
    every run (on the full disk the store itself could not close them)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(DISK_MB * 1024)}k", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("needs `mount -t tmpfs` (root) to make a small disk")
    try:
        path = tiny_study(tmp_path, name="full", tracking={"artifacts": True},
                          sweep={"grid": {"quantizer.codebook_size": [8, 16, 32, 64, 128, 256, 512, 1024]}},
                          base={"train": {"steps": 100, "eval_every": 50, "device": "cpu"}})
        out = disk / "out"
        cli = [sys.executable, "-m", "vqstudy.cli"]
        r = subprocess.run([*cli, "run", str(path), "--out", str(out), "--address", ray_address],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 1, r.stderr[-2000:]
        assert "No space left on device" in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
        subprocess.run(["mount", "-o", "remount,size=400m", str(disk)], check=True)
        r = subprocess.run([*cli, "resume", str(out), "--address", ray_address], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "full: 8 finished (of 8)" in r.stdout
        client = MlflowClient(StudyFolder(out).load()[1].tracking_uri)
        runs = client.search_runs([client.get_experiment_by_name("full").experiment_id])
        assert len(runs) == 9 and all(run.info.status == "FINISHED" for run in runs)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


DISK_MB = 1.5


@pytest.mark.slow
@pytest.mark.parametrize("sections, message", [
    ({"base": {"quantizer": {"codebook_size": 2 ** 40}}}, "(quantizer.codebook_size 1,099,511,627,776 x model.latent_dim 4"),
    ({"base": {"model": {"encoder_width": 1_000_000}}}, "model widths 1,000,000/"),
    ({"base": {"train": {"batch_size": 10 ** 9}}}, "batches of 1,000,000,000 vectors"),
    ({"base": {"data": {"name": "mnist", "root": "no/such/folder"}, "model": {"latent_dim": 4}}},
     "data.root: no folder 'no/such/folder' for data.name mnist"),
    ({"base": {"data": {"name": "imagefolder", "root": "/no/images"}}}, "data.root: no folder '/no/images'"),
])
def test_trials_that_cannot_run_here_are_refused_before_any_starts(tmp_path, ray_address, capsys, sections, message):
    """A codebook no node's memory holds, a dataset folder that is not there: one line, exit 2,
    no trial started (they used to fail three times each inside Ray)."""
    path = tiny_study(tmp_path, name="cannot", **sections)
    assert message in _refused(["run", str(path), "--out", str(tmp_path / "out")], capsys)
    assert not (tmp_path / "out").exists()
