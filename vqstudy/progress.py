"""What a running study prints on stderr (a Tune Callback on the driver): a line as each
trial starts and as it ends, named by what the study varies, with the counts (running,
pending, done), an ETA from the run times of the trials that ended, and, for a trial that
ended badly, why in one line."""
from __future__ import annotations

import datetime
import math
import sys
import time

from .catalogue import HEADLINE
from .connection import root_cause
from .outcome import Outcome, from_ray
from .study import Study
from .tables import fmt, trial_label
from .trainable import unpack


def failure_reason(error: BaseException | None) -> str:
    """One line for a trial's error: the exception the trial raised, not Ray's wrapper."""
    return root_cause(error)[:2000] if error is not None else "failed"


def eta(durations: list[float], running: int, pending: int, parallel: int) -> str:
    """What is left, at the mean run time of the trials that ended, `parallel` at a time."""
    if not durations or not running + pending:
        return ""
    seconds = math.ceil((running + pending) / max(parallel, 1)) * sum(durations) / len(durations)
    return f", ETA ~{datetime.timedelta(seconds=round(seconds))}"


def progress_callback(study: Study):
    """The Callback (defined here: subclassing needs Ray)."""
    from ray.tune import Callback

    class Progress(Callback):
        def __init__(self):
            self.started: dict[str, float] = {}     # running trials -> when they started
            self.durations: list[float] = []
            self.parallel = 1
            self.done: int | None = None              # counted once from Tune's trials (a resume goes on)

        def _counts(self, trials, ending=None) -> tuple[int, int, int]:
            """(running, pending, done), kept as trials start and end: a scan of every trial
            at every event would cost O(trials^2) on a study of thousands."""
            if self.done is None:
                self.done = sum(t.is_finished() for t in trials if t is not ending)
            running = len(self.started)
            return running, max(study.num_trials - running - self.done, 0), self.done

        def _say(self, text: str) -> None:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()

        def on_trial_start(self, iteration, trials, trial, **info):
            self.started[trial.trial_id] = time.monotonic()
            running, pending, done = self._counts(trials)
            self.parallel = max(self.parallel, running)
            self._say(f"[{done}/{study.num_trials}] {trial.trial_id} started       {trial_label(study, trial.config)}"
                      f"  ({running} running, {pending} pending)")

        def _ended(self, trials, trial, outcome: Outcome, reason: str | None = None) -> None:
            if trial.trial_id in self.started:
                self.durations.append(time.monotonic() - self.started.pop(trial.trial_id))
            self._counts(trials, ending=trial)
            self.done += 1
            running, pending, done = self._counts(trials)
            r = unpack(trial.last_result or {})
            metric = " ".join(f"{k}={fmt(r[k])}" for k in HEADLINE if k in r)
            why = f"  -- {reason}" if reason else ""
            self._say(f"[{done}/{study.num_trials}] {trial.trial_id} {outcome.value:<13} "
                      f"{trial_label(study, trial.config)}  {metric}{why}  ({running} running, {pending} pending"
                      f"{eta(self.durations, running, pending, self.parallel)})")

        def on_trial_complete(self, iteration, trials, trial, **info):
            result = trial.last_result or {}
            outcome = from_ray("TERMINATED", result, study.planned_steps(trial.config))
            self._ended(trials, trial, outcome, result.get("failure") if outcome is Outcome.DIVERGED else None)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._ended(trials, trial, Outcome.FAILED, failure_reason(trial.get_error()))

    return Progress()
