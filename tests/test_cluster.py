"""Studies on a two-node Ray cluster on loopback whose worker node cannot see the driver's
disk: a head with no CPUs (so every trial runs on the worker) and a worker started in its
own mount namespace with a tmpfs over the folder that holds the study folders. Storage is
an S3-compatible server on loopback (moto) used through pyarrow's S3 filesystem; tracking
is the driver's default SQLite store. Every study ends with the driver's audit passing."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from .conftest import tiny_study

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _can_unshare() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-m", "--propagation", "private", "true"], capture_output=True).returncode == 0


if not _can_unshare():
    pytest.skip("needs `unshare -m` (root in a Linux container) to hide the driver's disk from a node",
                allow_module_level=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise TimeoutError(f"timed out waiting for {what}")


def stop(proc: subprocess.Popen) -> None:
    """Stop a process started in its own session, and everything it started, by process group."""
    try:
        os.killpg(proc.pid, 9)
    except ProcessLookupError:
        pass
    proc.wait()


def env() -> dict[str, str]:
    return {**os.environ, **CREDENTIALS, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on loopback with a bucket; yields the --storage URI prefix."""
    import pyarrow.fs as pafs

    port = free_port()
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"endpoint_override=127.0.0.1:{port}&scheme=http"
    try:
        os.environ.update(CREDENTIALS)
        wait_until(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0, 30, "moto")
        fs, _ = pafs.FileSystem.from_uri(f"s3://studies?{endpoint}&allow_bucket_creation=true")
        fs.create_dir("studies")
        yield f"s3://studies/runs?{endpoint}"
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(address, hidden): a head with 0 CPUs and a 2-CPU worker that cannot see `hidden`, the
    folder under which the tests put their study folders. On the worker, `hidden` holds a
    stale study folder `stale/` (a copy of an old study left on a node's own disk)."""
    hidden = tmp_path_factory.mktemp("driver-disk")
    temp = Path(tempfile.mkdtemp(prefix="vqs-"))   # outside `hidden`: each node's own --temp-dir
    port = free_port()
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--num-cpus", "0", "--port", str(port),
                             "--temp-dir", str(temp / "head"), "--include-dashboard", "false", "--block"],
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    stale = hidden / "stale"
    script = (f"mount -t tmpfs tmpfs {hidden} && mkdir -p {stale}/ray && echo '{{\"tracking_uri\": \"sqlite:///x\"}}' "
              f"> {stale}/vqstudy.json && echo junk > {stale}/mlflow.db && exec {BIN / 'ray'} start --address "
              f"127.0.0.1:{port} --num-cpus 2 --temp-dir {temp / 'worker'} --block")
    worker = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script], env=env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        wait_until(lambda: _alive_cpu_nodes(address) == 1, 90, "the worker node")
        yield address, hidden
    finally:
        stop(worker)
        stop(head)
        shutil.rmtree(temp, ignore_errors=True)


def _alive_cpu_nodes(address: str) -> int:
    code = ("import ray, logging; ray.init(address=%r, logging_level=logging.ERROR); "
            "print(sum(1 for n in ray.nodes() if n['Alive'] and n['Resources'].get('CPU')))" % address)
    r = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True, timeout=60)
    return int(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 and r.stdout.strip() else -1


def vqstudy(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vqstudy.cli", *map(str, args)], env=env(), capture_output=True,
                          text=True, timeout=timeout)


def study_file(tmp_path, name: str) -> Path:
    grid = {"quantizer.name": ["vq", "simvq"], "quantizer.codebook_size": [8, 16]}
    return tiny_study(tmp_path, name=name, sweep={"grid": grid}, tracking={"artifacts": True})


def test_study_runs_on_a_node_without_the_driver_disk(tmp_path, cluster, s3):
    """Checkpoints on S3, MLflow in the driver's SQLite: every trial finished on the worker node
    (over a stale study folder of the same path there), one child run per trial with its final
    metrics and figures, and the export has a row per trial."""
    address, hidden = cluster
    out = hidden / "stale"
    r = vqstudy("run", study_file(tmp_path, "nodisk"), "--out", out, "--address", address, "--storage", s3)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "nodisk: 4 finished (of 4)" in r.stdout and "audit" not in r.stderr
    records = json.loads((out / "vqstudy.json").read_text())
    assert records["storage"] == s3 and records["tracking_uri"].startswith("sqlite:///")
    client = MlflowClient(records["tracking_uri"])
    children = client.search_runs([records["experiment_id"]], filter_string="tags.`mlflow.parentRunId` != ''")
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)
    assert all(c.data.metrics["step"] == 30 for c in children)
    assert all([a.path for a in client.list_artifacts(c.info.run_id)] == ["code_usage.png"] for c in children)
    assert vqstudy("export", out).returncode == 0 and pq.read_table(out / "results.parquet").num_rows == 4
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(s3)
    saved = fs.get_file_info(pafs.FileSelector(f"{root}/{records['experiment_dir']}", recursive=True))
    assert sum(i.base_name == "checkpoint.pt" for i in saved) == 4   # one kept checkpoint per trial
    status = vqstudy("status", out)
    assert status.returncode == 0 and "4 finished (of 4)" in status.stdout


def test_a_folder_the_worker_cannot_see_is_refused(tmp_path, cluster):
    """Without --storage, the study folder is the driver's own disk: preflight finds that the
    worker does not see it, exit 2 in one line naming the node, nothing left behind."""
    address, hidden = cluster
    out = hidden / "local"
    t0 = time.time()
    r = vqstudy("run", study_file(tmp_path, "local"), "--out", out, "--address", address)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert "does not see the storage the driver sees" in r.stderr and "give --storage URI" in r.stderr
    assert time.time() - t0 < 60 and not out.exists()


def test_unreachable_storage_and_tracking_are_refused(tmp_path, cluster, s3):
    """Storage or a tracking server nobody answers at: exit 2, one line, before any trial."""
    address, hidden = cluster
    dead = free_port()
    bad_storage = f"s3://studies/runs?endpoint_override=127.0.0.1:{dead}&scheme=http"
    r = vqstudy("run", study_file(tmp_path, "nostore"), "--out", hidden / "nostore", "--address", address,
                "--storage", bad_storage)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert "cannot write to the storage" in r.stderr
    r = vqstudy("run", study_file(tmp_path, "notrack"), "--out", hidden / "notrack", "--address", address,
                "--storage", s3, "--tracking-uri", f"http://127.0.0.1:{dead}")
    assert r.returncode == 2 and f"--tracking-uri: cannot reach http://127.0.0.1:{dead}" in r.stderr
    assert not (hidden / "nostore").exists() and not (hidden / "notrack").exists()
