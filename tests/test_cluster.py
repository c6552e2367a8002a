"""Studies on a two-node Ray cluster on loopback whose worker node cannot see the driver's
disk: a head with no CPUs (so every trial runs on the worker) and a worker started in its
own mount namespace with a tmpfs over the folder that holds the study folders. Storage is
an S3-compatible server on loopback (moto) used through pyarrow's S3 filesystem; tracking
is the driver's default SQLite store, or an `mlflow server` (SQLite, then PostgreSQL backend).
Every study ends with the driver's audit passing."""
from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from vqstudy.folder import StudyFolder

from .conftest import error_line, tiny_study

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


def stop_node(proc: subprocess.Popen) -> None:
    """A node lost for good: every process in its mount namespace killed, also the Ray workers
    that left its process group (they would otherwise finish their trials as orphans)."""
    namespace = os.readlink(f"/proc/{proc.pid}/ns/mnt")
    assert namespace != os.readlink("/proc/self/ns/mnt"), "the node shares our mount namespace"
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and os.readlink(f"/proc/{entry}/ns/mnt") == namespace:
                os.kill(int(entry), 9)
        except OSError:
            continue
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


class Cluster:
    """A head with 0 CPUs and a 2-CPU worker that cannot see `hidden`, the folder under which
    the tests put their study folders. On the worker, `hidden` holds a stale study folder
    `stale/` (a copy of an old study left on a node's own disk)."""

    def __init__(self, hidden: Path):
        self.hidden, self.temp, self.port = hidden, Path(tempfile.mkdtemp(prefix="vqs-")), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--num-cpus", "0", "--port", str(self.port),
                                      "--temp-dir", str(self.temp / "head"), "--include-dashboard", "false", "--block"],
                                     env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        self.worker = self.start_worker()

    def start_worker(self) -> subprocess.Popen:
        """A worker node in its own mount namespace (each with its own --temp-dir), joined."""
        stale, temp = self.hidden / "stale", tempfile.mkdtemp(prefix="w", dir=self.temp)
        script = (f"mount -t tmpfs tmpfs {self.hidden} && mkdir -p {stale}/ray && echo '{{\"tracking_uri\": "
                  f"\"sqlite:///x\"}}' > {stale}/vqstudy.json && echo junk > {stale}/mlflow.db && exec "
                  f"{BIN / 'ray'} start --address {self.address} --num-cpus 2 --temp-dir {temp} --block")
        worker = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script], env=env(),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_until(lambda: _alive_cpu_nodes(self.address) == 1, 90, "the worker node")
        return worker

    def close(self) -> None:
        stop_node(self.worker)
        stop(self.head)
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("driver-disk"))
    try:
        yield c
    finally:
        c.close()


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
    address, hidden = cluster.address, cluster.hidden
    out = hidden / "stale"
    r = vqstudy("run", study_file(tmp_path, "nodisk"), "--out", out, "--address", address, "--storage", s3)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "nodisk: 4 finished (of 4)" in r.stdout and "audit" not in r.stderr
    records = json.loads((out / "vqstudy.json").read_text())
    assert records["storage"] == s3 and records["tracking_uri"] is None   # the mlflow.db beside vqstudy.json
    client = MlflowClient(StudyFolder(out).load()[1].tracking_uri)
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
    address, hidden = cluster.address, cluster.hidden
    out = hidden / "local"
    t0 = time.time()
    r = vqstudy("run", study_file(tmp_path, "local"), "--out", out, "--address", address)
    assert r.returncode == 2 and error_line(r.stderr)
    assert "does not see the storage the driver sees" in r.stderr and "give --storage URI" in r.stderr
    assert time.time() - t0 < 60 and not out.exists()


def test_unreachable_storage_and_tracking_are_refused(tmp_path, cluster, s3):
    """Storage or a tracking server nobody answers at: exit 2, one line, before any trial."""
    address, hidden = cluster.address, cluster.hidden
    dead = free_port()
    bad_storage = f"s3://studies/runs?endpoint_override=127.0.0.1:{dead}&scheme=http"
    r = vqstudy("run", study_file(tmp_path, "nostore"), "--out", hidden / "nostore", "--address", address,
                "--storage", bad_storage)
    assert r.returncode == 2 and error_line(r.stderr)
    assert "cannot write to the storage" in r.stderr
    r = vqstudy("run", study_file(tmp_path, "notrack"), "--out", hidden / "notrack", "--address", address,
                "--storage", s3, "--tracking-uri", f"http://127.0.0.1:{dead}")
    assert r.returncode == 2 and f"--tracking-uri: cannot reach http://127.0.0.1:{dead}" in r.stderr
    assert not (hidden / "nostore").exists() and not (hidden / "notrack").exists()


def _postgres_bin(name: str) -> str | None:
    """A PostgreSQL program: on PATH, or where Debian's package puts it."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return shutil.which(name) or (found[-1] if found else None)


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server on loopback with an empty database; yields its SQLAlchemy URI.
    PostgreSQL refuses to run as root: as root it runs as the `postgres` user Debian's package makes."""
    import pwd

    import psycopg

    initdb, server = _postgres_bin("initdb"), _postgres_bin("postgres")
    if not (initdb and server):
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql, as .ci/run does)")
    as_user: list[str] = []
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("PostgreSQL refuses to run as root, and there is no `postgres` user to run it as")
        as_user = ["runuser", "-u", "postgres", "--"]
    data = Path(tempfile.mkdtemp(prefix="vqstudy-pg-"))   # not under pytest's root-only tmp folders
    if as_user:
        os.chown(data, owner.pw_uid, owner.pw_gid)
    subprocess.run([*as_user, initdb, "-D", str(data), "-A", "trust", "-U", "mlflow", "--no-sync"],
                   check=True, capture_output=True)
    port = free_port()
    proc = subprocess.Popen([*as_user, server, "-D", str(data), "-p", str(port), "-h", "127.0.0.1", "-k", str(data)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def up() -> bool:
        try:
            psycopg.connect(host="127.0.0.1", port=port, user="mlflow", dbname="postgres").close()
            return True
        except psycopg.OperationalError:
            return False
    try:
        wait_until(up, 60, "PostgreSQL")
        with psycopg.connect(host="127.0.0.1", port=port, user="mlflow", dbname="postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE mlflow")
        yield f"postgresql://mlflow@127.0.0.1:{port}/mlflow"
    finally:
        stop(proc)
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def mlflow_server(request, tmp_path_factory):
    """A real `mlflow server` on loopback (SQLite, then PostgreSQL backend; proxied artifacts);
    yields its URI. MLflow 3.17 answers 403 to a Host it does not allow, hence --allowed-hosts."""
    import urllib.request

    root, port = tmp_path_factory.mktemp("mlflow-server"), free_port()
    backend = f"sqlite:///{root}/mlflow.db" if request.param == "sqlite" else request.getfixturevalue("postgres")
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", backend, "--artifacts-destination",
                             str(root / "artifacts"), "--allowed-hosts", f"127.0.0.1:{port},localhost:{port}",
                             "--workers", "1"], env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    uri = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200
        except OSError:
            return False
    try:
        wait_until(up, 90, "mlflow server")
        yield uri
    finally:
        stop(proc)


def test_study_tracked_by_an_mlflow_server(tmp_path, cluster, s3, mlflow_server):
    """The same study tracked by a tracking server: the server holds one child run per trial with
    its figures; `export DIR` and `export --run PARENT` give this study's rows only, also when
    another study shares the experiment."""
    address, hidden = cluster.address, cluster.hidden
    path = study_file(tmp_path, "served")
    port = mlflow_server.rsplit(":", 1)[1]   # one pair of study folders per server
    outs = [hidden / f"served1-{port}", hidden / f"served2-{port}"]
    for out in outs:   # two studies in one experiment of one store
        r = vqstudy("run", path, "--out", out, "--address", address, "--storage", s3, "--tracking-uri", mlflow_server)
        assert r.returncode == 0, r.stderr[-3000:]
    records = json.loads((outs[0] / "vqstudy.json").read_text())
    client = MlflowClient(mlflow_server)
    children = client.search_runs([records["experiment_id"]],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{records['parent_run_id']}'")
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)
    assert [a.path for a in client.list_artifacts(children[0].info.run_id)] == ["code_usage.png"]
    assert vqstudy("export", outs[0]).returncode == 0
    by_folder = pq.read_table(outs[0] / "results.parquet")
    r = vqstudy("export", "--run", records["parent_run_id"], "--tracking-uri", mlflow_server, "-o", tmp_path / "r.parquet")
    assert r.returncode == 0, r.stderr
    by_run = pq.read_table(tmp_path / "r.parquet")
    assert by_folder.num_rows == by_run.num_rows == 4 and by_folder.equals(by_run)
    assert set(by_run.column("mlflow_run_id").to_pylist()) == {c.info.run_id for c in children}


def test_killed_driver_resumes_on_the_cluster(tmp_path, cluster, s3):
    """The driver is SIGKILLed mid-study (after a trial ended, with Ray's state on S3, at
    whatever moment of Tune's writes that is);
    `vqstudy resume` ends with each trial finished once: one child run per trial, every
    evaluation logged once, an export row per trial, the audit passing."""
    address, hidden = cluster.address, cluster.hidden
    out = hidden / "killed"
    path = tiny_study(tmp_path, name="killed", sweep={"grid": {"quantizer.codebook_size": [8, 16, 32, 64, 128, 256]}},
                      base={"train": {"steps": 3000, "eval_every": 500, "device": "cpu"}})
    driver = subprocess.Popen([sys.executable, "-m", "vqstudy.cli", "run", str(path), "--out", str(out), "--address",
                               address, "--storage", s3], env=env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)

    def a_trial_ended() -> bool:
        ledger = out / "ledger.jsonl"
        return ledger.exists() and '"op":"end"' in ledger.read_text()
    try:
        wait_until(a_trial_ended, 180, "a finished trial")
    finally:
        stop(driver)
    ended = (out / "ledger.jsonl").read_text().count('"op":"end"')
    assert ended < 6, "the study finished before the kill"
    r = vqstudy("resume", out, "--address", address)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "killed: 6 finished (of 6)" in r.stdout and "audit" not in r.stderr
    records = json.loads((out / "vqstudy.json").read_text())
    client = MlflowClient(StudyFolder(out).load()[1].tracking_uri)
    children = client.search_runs([records["experiment_id"]], filter_string="tags.`mlflow.parentRunId` != ''")
    assert len(children) == 6 and len({c.data.tags["vqstudy.trial_id"] for c in children}) == 6
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "recon_mse")]
        assert sorted(steps) == list(range(500, 3001, 500)), steps
    assert vqstudy("export", out).returncode == 0 and pq.read_table(out / "results.parquet").num_rows == 6


def test_a_lost_worker_node_is_survived(tmp_path, cluster, s3):
    """The only worker node dies mid-study (its whole process group killed) and another joins:
    the trials fail over to it from their checkpoints on S3 and the study finishes, exactly
    recorded."""
    out = cluster.hidden / "nodeloss"
    path = tiny_study(tmp_path, name="nodeloss", sweep={"grid": {"quantizer.codebook_size": [8, 16]}},
                      base={"train": {"steps": 8000, "eval_every": 1000, "device": "cpu"}})
    driver = subprocess.Popen([sys.executable, "-m", "vqstudy.cli", "run", str(path), "--out", str(out), "--address",
                               cluster.address, "--storage", s3], env=env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        ledger = out / "ledger.jsonl"
        wait_until(lambda: ledger.exists() and ledger.read_text().count('"op":"checkpoint"') >= 2, 180,
                   "both trials' first checkpoints")
        stop_node(cluster.worker)
        cluster.worker = cluster.start_worker()
        stdout, stderr = driver.communicate(timeout=300)
    finally:
        stop(driver)
    assert driver.returncode == 0, stderr[-3000:]
    assert "nodeloss: 2 finished (of 2)" in stdout and "failures" in stdout   # the table shows the retries
    records = json.loads((out / "vqstudy.json").read_text())
    client = MlflowClient(StudyFolder(out).load()[1].tracking_uri)
    children = client.search_runs([records["experiment_id"]], filter_string="tags.`mlflow.parentRunId` != ''")
    assert len(children) == 2 and all("vqstudy.restored_at_step" in c.data.tags for c in children)
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "recon_mse")]
        assert sorted(steps) == list(range(1000, 8001, 1000)), steps


def test_a_cluster_left_without_workers_ends_resumable(tmp_path, cluster, s3):
    """The only worker node dies and none replaces it: Tune alone would wait for resources
    forever; the driver's watch ends the study as interrupted once no node could run a trial
    for its grace period (15 s here), exit 1, parent run KILLED. Once a worker joins again,
    resume finishes every trial once."""
    out = cluster.hidden / "orphaned"
    path = tiny_study(tmp_path, name="orphaned", sweep={"grid": {"quantizer.codebook_size": [8, 16]}},
                      base={"train": {"steps": 8000, "eval_every": 1000, "device": "cpu"}})
    driver = subprocess.Popen([sys.executable, "-m", "vqstudy.cli", "run", str(path), "--out", str(out), "--address",
                               cluster.address, "--storage", s3], env={**env(), "VQSTUDY_CLUSTER_GRACE_S": "15"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        ledger = out / "ledger.jsonl"
        wait_until(lambda: ledger.exists() and ledger.read_text().count('"op":"checkpoint"') >= 2, 180,
                   "both trials' first checkpoints")
        stop_node(cluster.worker)
        lost = time.time()
        _, stderr = driver.communicate(timeout=240)
    finally:
        stop(driver)
        cluster.worker = cluster.start_worker()
    assert driver.returncode == 1, stderr[-3000:]
    assert time.time() - lost < 120
    assert "no node of the Ray cluster could run a trial for 15 s" in stderr and "Traceback" not in stderr
    assert f"continue with: vqstudy resume {out}" in stderr
    records = StudyFolder(out).load()[1]
    assert MlflowClient(records.tracking_uri).get_run(records.parent_run_id).info.status == "KILLED"
    r = vqstudy("resume", out, "--address", cluster.address)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "orphaned: 2 finished (of 2)" in r.stdout and "audit" not in r.stderr


def _head(temp: Path, port: int) -> subprocess.Popen:
    """A one-node cluster (a head with 2 CPUs) in its own process group."""
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--num-cpus", "2", "--port", str(port), "--temp-dir",
                             str(temp), "--include-dashboard", "false", "--block"], env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_until(lambda: _alive_cpu_nodes(f"127.0.0.1:{port}") == 1, 90, "the head node")
    return head


def test_a_lost_control_plane_ends_the_study_resumable(tmp_path):
    """The cluster's GCS dies under the driver (its head killed): Ray would block every call
    and end the driver after 60 s leaving the runs RUNNING; the driver's watch ends it within
    a third of its grace period (5 s of 15 here) with one line, exit 1, the runs KILLED. On a
    new cluster, resume finishes every trial once."""
    temp = Path(tempfile.mkdtemp(prefix="vqs-gcs-"))
    out = tmp_path / "out"
    path = tiny_study(tmp_path, name="headless", base={"train": {"steps": 8000, "eval_every": 1000, "device": "cpu"}})
    port = free_port()
    head = _head(temp / "a", port)
    try:
        driver = subprocess.Popen([sys.executable, "-m", "vqstudy.cli", "run", str(path), "--out", str(out),
                                   "--address", f"127.0.0.1:{port}"], env={**env(), "VQSTUDY_CLUSTER_GRACE_S": "15"},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        ledger = out / "ledger.jsonl"
        wait_until(lambda: ledger.exists() and '"op":"start"' in ledger.read_text(), 120, "a trial")
        stop(head)
        lost = time.time()
        _, stderr = driver.communicate(timeout=120)
        assert driver.returncode == 1 and time.time() - lost < 45, stderr[-3000:]
        assert "control plane (GCS at" in stderr and f"continue with: vqstudy resume {out}" in stderr
        assert "Traceback" not in stderr
        records = StudyFolder(out).load()[1]
        client = MlflowClient(records.tracking_uri)
        assert {r.info.status for r in client.search_runs([records.experiment_id])} == {"KILLED"}
        port = free_port()
        head = _head(temp / "b", port)
        r = vqstudy("resume", out, "--address", f"127.0.0.1:{port}")
        assert r.returncode == 0, r.stderr[-3000:]
        assert "headless: 2 finished (of 2)" in r.stdout and "audit" not in r.stderr
    finally:
        stop(head)
        shutil.rmtree(temp, ignore_errors=True)
