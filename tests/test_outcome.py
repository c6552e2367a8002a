"""One status vocabulary: Ray's and MLflow's words map to the project's outcomes in one place."""
from __future__ import annotations

import pytest

from vqstudy.outcome import Outcome, all_ok, from_mlflow, from_ray, mlflow_status


@pytest.mark.parametrize("status, result, expected", [
    ("TERMINATED", {"step": 100}, Outcome.FINISHED),
    ("TERMINATED", {"step": 40}, Outcome.STOPPED_EARLY),            # a scheduler stopped it at step 40 of 100
    ("TERMINATED", {"step": 30, "outcome": "diverged"}, Outcome.DIVERGED),
    ("ERROR", {"step": 50}, Outcome.FAILED),
    ("ERROR", {}, Outcome.FAILED),
    ("RUNNING", {"step": 50}, Outcome.NOT_FINISHED),
    ("PENDING", {}, Outcome.NOT_FINISHED),
    ("PAUSED", {"step": 50}, Outcome.NOT_FINISHED),
])
def test_from_ray(status, result, expected):
    """A Tune trial's status and last result (of a 100-step trial) give its outcome."""
    assert from_ray(status, result, planned_steps=100) is expected


@pytest.mark.parametrize("status, tag, expected", [
    ("FINISHED", "finished", Outcome.FINISHED),
    ("FINISHED", "stopped_early", Outcome.STOPPED_EARLY),
    ("FAILED", "diverged", Outcome.DIVERGED),
    ("FAILED", "failed", Outcome.FAILED),
    ("FINISHED", None, Outcome.FINISHED),        # a run closed by hand or by another tool
    ("FAILED", None, Outcome.FAILED),
    ("RUNNING", "finished", Outcome.NOT_FINISHED),  # reopened by a resume: its old verdict no longer holds
    ("KILLED", None, Outcome.NOT_FINISHED),
])
def test_from_mlflow(status, tag, expected):
    """A child run's status and vqstudy.outcome tag give its outcome."""
    assert from_mlflow(status, tag) is expected


def test_round_trip_through_mlflow():
    """Every outcome a run is closed with reads back as itself."""
    for outcome in Outcome:
        if outcome.done:
            assert from_mlflow(mlflow_status(outcome), outcome.value) is outcome


def test_exit_code_rule():
    """A study succeeds when every trial ran and none failed or diverged; stopped early is fine."""
    assert all_ok([Outcome.FINISHED, Outcome.STOPPED_EARLY], 2)
    assert not all_ok([Outcome.FINISHED], 2)
    assert not all_ok([Outcome.FINISHED, Outcome.DIVERGED], 2)
    assert not all_ok([Outcome.FINISHED, Outcome.NOT_FINISHED], 2)
