"""How a trial ended, in the project's own words, mapped from Ray's and MLflow's in one place.

Ray says TERMINATED / ERROR / RUNNING / PENDING / PAUSED; MLflow says FINISHED / FAILED /
KILLED / RUNNING. Neither says "diverged" or "stopped early by the scheduler", and they
disagree on what a stopped trial is (Tune TERMINATED, MLflow KILLED). Every table, export,
report and exit code speaks `Outcome`; the trainable writes it on the trial's MLflow run
(tag `vqstudy.outcome`) and reports it to Tune, and the functions below read it back.
"""
from __future__ import annotations

from enum import Enum


class Outcome(str, Enum):
    FINISHED = "finished"            # ran all its steps
    STOPPED_EARLY = "stopped_early"  # a scheduler (ASHA) stopped it; its metrics are real but partial
    DIVERGED = "diverged"            # non-finite loss: a property of the config, not retried
    FAILED = "failed"                # crashed more often than sweep.max_failures allows
    NOT_FINISHED = "not_finished"    # pending, running, or interrupted with the driver

    def __str__(self) -> str:
        return self.value

    @property
    def done(self) -> bool:
        """The trial ran as far as it will (its record is final, whatever it says)."""
        return self is not Outcome.NOT_FINISHED

    @property
    def ok(self) -> bool:
        """Not a failure: what a study's exit code and the MLflow status FINISHED mean."""
        return self in (Outcome.FINISHED, Outcome.STOPPED_EARLY)


def from_ray(status: str, last_result: dict, planned_steps: int) -> Outcome:
    """A Tune trial's status and last result -> its outcome."""
    if last_result.get("outcome") == Outcome.DIVERGED.value:
        return Outcome.DIVERGED
    if status == "TERMINATED":
        return Outcome.FINISHED if last_result.get("step", planned_steps) >= planned_steps else Outcome.STOPPED_EARLY
    if status == "ERROR":
        return Outcome.FAILED
    return Outcome.NOT_FINISHED


def from_mlflow(status: str, outcome_tag: str | None) -> Outcome:
    """A child run's status and `vqstudy.outcome` tag -> its outcome. The tag is written when
    the run ends; a run still RUNNING (its driver was killed) has not ended, whatever it says."""
    if status not in ("FINISHED", "FAILED"):
        return Outcome.NOT_FINISHED
    if outcome_tag in Outcome._value2member_map_:
        return Outcome(outcome_tag)
    return Outcome.FINISHED if status == "FINISHED" else Outcome.FAILED


def mlflow_status(outcome: Outcome) -> str:
    """The MLflow run status that goes with an outcome (the UI's colours)."""
    if outcome is Outcome.NOT_FINISHED:
        return "KILLED"
    return "FINISHED" if outcome.ok else "FAILED"


def all_ok(outcomes: list[Outcome], total: int) -> bool:
    """Every one of a study's `total` trials ran and none failed or diverged: exit code 0."""
    return len(outcomes) == total and all(o.ok for o in outcomes)
