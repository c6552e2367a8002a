"""MLflow records without Ray: exactly one run per trial, and a reopened run starts clean."""
from __future__ import annotations

from mlflow.tracking import MlflowClient

from vqstudy import tracking
from vqstudy.folder import StudyFolder
from vqstudy.outcome import Outcome


def test_reopened_run_drops_the_earlier_attempts_verdict(tmp_path):
    """A trial that failed (or was stopped) and is retried reopens the same run, RUNNING again,
    without the failure or stop tags of its earlier attempt; its logged steps are remembered."""
    uri = StudyFolder(tmp_path).default_tracking_uri
    exp = tracking.ensure_experiment(uri, "e", tmp_path / "art")
    parent = tracking.start_parent(uri, exp, "p", {}, {})
    first = tracking.TrialRun.open(uri, exp, parent, "t1", "t1", {"a.b": 1}, {})
    first.log({"step": 10, "recon_mse": 0.5}, step=10)
    first.end(Outcome.STOPPED_EARLY, stopped_at=10)
    first.client.set_tag(first.run_id, tracking.FAILURE_TAG, "RuntimeError: worker died")
    first.client.set_tag(first.run_id, tracking.OUTCOME_TAG, Outcome.FAILED.value)
    known = tracking.child_run_ids(uri, exp, parent)
    assert known == {"t1": first.run_id}
    again = tracking.TrialRun.open(uri, exp, parent, "t1", "t1", {"a.b": 1}, {}, known["t1"])
    run = MlflowClient(uri).get_run(again.run_id)
    assert again.run_id == first.run_id and run.info.status == "RUNNING"
    assert not {tracking.FAILURE_TAG, tracking.STOPPED_TAG, tracking.OUTCOME_TAG} & set(run.data.tags)
    assert again.logged_step == 10
    again.end(Outcome.FINISHED)
    children = MlflowClient(uri).search_runs([exp], filter_string=f"tags.`{tracking.PARENT_TAG}` = '{parent}'")
    assert len(children) == 1 and children[0].info.status == "FINISHED"
