"""The study's ledger and its projection into MLflow, without Ray: torn lines, one writer,
replay, and an idempotent, exactly-once projection; the audit names what MLflow lacks."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from vqstudy import snapshot, tracking
from vqstudy.errors import ConfigError
from vqstudy.folder import StudyFolder
from vqstudy.ledger import Ledger, replay
from vqstudy.outcome import Outcome
from vqstudy.recorder import Committer, Projector, audit, project
from vqstudy.storage import Storage


def write_trial(ledger: Ledger, trial: str, steps=(10, 20), outcome: str | None = "finished"):
    ledger.started(trial, f"run_{trial}", {"quantizer.codebook_size": 16})
    for s in steps:
        ledger.result(trial, {"step": s, "recon_mse": 1.0 / s, "utilization": 0.5})
    if outcome:
        ledger.ended(trial, outcome)


def test_torn_last_line_is_dropped_and_writing_goes_on(tmp_path):
    """A driver killed mid-write leaves a torn last line: replay drops it, the next writer starts a new line."""
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path)
    write_trial(ledger, "a")
    ledger.close()
    with open(path, "a") as f:
        f.write('{"op":"result","trial":"a","metrics":{"st')    # killed here
    ledger = Ledger(path)
    write_trial(ledger, "b", outcome="diverged")
    ledger.close()
    trials = replay(path)
    assert list(trials) == ["a", "b"] and [r["step"] for r in trials["a"].results] == [10, 20]
    assert trials["b"].outcome == "diverged" and trials["a"].last_step == 20


def test_one_writer_at_a_time(tmp_path):
    """A second driver on the same study is refused with the holder's pid, also from another process."""
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path)
    with pytest.raises(ConfigError, match="another vqstudy driver is writing this study"):
        Ledger(path)
    code = f"from vqstudy.ledger import Ledger; Ledger({str(path)!r})"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode != 0 and "another vqstudy driver" in r.stderr
    ledger.close()
    Ledger(path).close()   # free again once the holder is gone


def projector_for(tmp_path) -> Projector:
    folder = StudyFolder(tmp_path)
    uri = folder.default_tracking_uri
    exp = tracking.ensure_experiment(uri, "e", folder.artifact_root)
    parent = tracking.start_parent(uri, exp, "p", {}, {})
    return Projector(uri, exp, parent, {"train.steps": 20}, {}, folder.root, folder.figures_dir)


def test_projection_is_exactly_once_and_idempotent(tmp_path):
    """Replaying the ledger twice (as a resume after a killed driver does) gives one run per
    trial, each step once, the outcome as recorded; an unfinished trial stays open."""
    ledger = Ledger(tmp_path / "ledger.jsonl")
    write_trial(ledger, "a")
    write_trial(ledger, "b", steps=(10,), outcome=None)
    ledger.close()
    projector = projector_for(tmp_path)
    project(tmp_path / "ledger.jsonl", projector)
    again = Projector(projector.uri, projector.experiment_id, projector.parent, projector.base, {},
                      projector.root, projector.figures_dir)   # a new driver on the same study
    project(tmp_path / "ledger.jsonl", again)
    client = MlflowClient(projector.uri)
    runs = {r.data.tags[tracking.TRIAL_TAG]: r for r in tracking.child_runs(projector.uri, projector.experiment_id,
                                                                          projector.parent)}
    assert sorted(runs) == ["a", "b"]
    assert [m.step for m in client.get_metric_history(runs["a"].info.run_id, "recon_mse")] == [10, 20]
    assert runs["a"].data.tags[tracking.OUTCOME_TAG] == "finished" and runs["a"].info.status == "FINISHED"
    assert runs["b"].info.status == "RUNNING"
    assert runs["a"].data.params["train.steps"] == "20" and runs["a"].data.params["quantizer.codebook_size"] == "16"


def test_audit_names_trials_missing_from_mlflow(tmp_path):
    """The ledger says done; MLflow lacks the run, or holds another step or outcome; Ray's
    committed state and the ledger disagree on which trials ended: each is named."""
    ledger = Ledger(tmp_path / "ledger.jsonl")
    write_trial(ledger, "a")
    write_trial(ledger, "b", steps=(10,))
    ledger.close()
    projector = projector_for(tmp_path)
    project(tmp_path / "ledger.jsonl", projector)
    rows = [{"trial_id": "a", "outcome": Outcome.FINISHED, "step": 20},
            {"trial_id": "b", "outcome": Outcome.FINISHED, "step": 20},      # MLflow stopped at 10
            {"trial_id": "c", "outcome": Outcome.DIVERGED, "step": 5},       # never recorded
            {"trial_id": "d", "outcome": Outcome.NOT_FINISHED}]              # not done: not audited
    assert audit(rows, projector) == ["b: MLflow says finished at step 10, the ledger says finished at step 20",
                                      "c: 0 child runs"]
    ray = {"a": "TERMINATED", "b": "TERMINATED", "c": "RUNNING", "d": "PENDING", "e": "ERROR"}
    assert audit(rows, projector, ray)[:2] == ["e: Ray says it ended, the ledger does not",
                                               "c: the ledger says it ended, Ray does not"]


def test_resume_cuts_the_ledger_back_to_its_last_commit(tmp_path):
    """What a killed driver appended after its last commit is set aside, not replayed."""
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path)
    write_trial(ledger, "a")
    committed = ledger.sync()
    write_trial(ledger, "b", outcome=None)
    ledger.close()
    Ledger(path, committed_bytes=committed).close()
    assert list(replay(path)) == ["a"]
    (aside,) = tmp_path.glob("ledger.rolledback-*.jsonl")
    assert '"trial":"b"' in aside.read_text()


def _staging(tmp_path, state: str) -> Path:
    staging = tmp_path / "staging"
    staging.mkdir(exist_ok=True)
    (staging / "experiment_state-s1.json").write_text(state)
    (staging / "tuner.pkl").write_bytes(b"tuner")
    return staging


def test_committer_writes_ledger_and_mlflow_only_at_a_commit(tmp_path):
    """Events wait for Tune's next save; the commit pairs the ledger's length with a copy of
    Tune's state, and only committed events reach MLflow."""
    projector = projector_for(tmp_path)
    ledger = Ledger(tmp_path / "ledger.jsonl")
    committer = Committer(ledger, projector, tmp_path / "ray-state")
    committer.staging = _staging(tmp_path, '{"trial_data": [["{\\"trial_id\\": \\"a\\", \\"status\\": \\"RUNNING\\"}", "{}"]]}')
    committer.record("started", "a", "run_a", {"quantizer.codebook_size": 16})
    committer.record("result", "a", {"step": 10, "recon_mse": 0.1})
    assert replay(ledger.path) == {}
    committer.drain()
    commit = snapshot.committed(tmp_path / "ray-state")
    assert commit.ledger_bytes == ledger.path.stat().st_size and commit.files == ("experiment_state-s1.json", "tuner.pkl")
    assert snapshot.trial_statuses(commit, tmp_path / "ray-state") == {"a": "RUNNING"}
    assert set(tracking.children(projector.uri, projector.experiment_id, projector.parent)) == {"a"}
    committer.record("ended", "a", "finished", None, None)   # the driver dies before Tune saves again
    ledger.close()
    assert replay(ledger.path)["a"].outcome is None


def test_restore_puts_the_committed_state_back(tmp_path):
    """A storage whose state is cut short, or newer than the commit, gets the committed one."""
    state_dir = tmp_path / "ray-state"
    commit = snapshot.save(_staging(tmp_path, '{"trial_data": []}'), state_dir, 0)
    storage = Storage(str(tmp_path / "store"), "ray")
    exp = tmp_path / "store" / "ray"
    exp.mkdir(parents=True)
    (exp / "experiment_state-s1.json").write_text('{"trial_da')           # cut short
    (exp / "experiment_state-s2.json").write_text('{"trial_data": []}')   # a session never committed
    (exp / "trial_x").mkdir()
    snapshot.restore(commit, state_dir, storage)
    assert sorted(p.name for p in exp.iterdir()) == ["experiment_state-s1.json", "trial_x", "tuner.pkl"]
    assert (exp / "experiment_state-s1.json").read_text() == '{"trial_data": []}'
    tuner = (state_dir / "g000001" / "tuner.pkl").stat().st_ino
    (tmp_path / "staging" / "experiment_state-s1.json").write_text('{"trial_data": [], "n": 2}')   # Tune saved again
    again = snapshot.save(tmp_path / "staging", state_dir, 5, commit)
    assert again.generation == "g000002" and [p.name for p in state_dir.iterdir() if p.is_dir()] == ["g000002"]
    assert (state_dir / "g000002" / "tuner.pkl").stat().st_ino == tuner   # unchanged: linked, not copied again
    assert (state_dir / "g000002" / "experiment_state-s1.json").read_text() == '{"trial_data": [], "n": 2}'
    assert snapshot.committed(state_dir) == again
