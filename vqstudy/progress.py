"""What a running study prints on stderr: one line per trial that ends, with its outcome,
its swept keys and its headline metrics (a Tune Callback on the driver)."""
from __future__ import annotations

import sys

from .catalogue import HEADLINE
from .outcome import Outcome, from_ray
from .study import Study
from .tables import fmt


def progress_callback(study: Study):
    """The Callback (defined here: subclassing needs Ray)."""
    from ray.tune import Callback

    class Progress(Callback):
        def __init__(self):
            self.done = 0

        def _line(self, trial, outcome: Outcome) -> None:
            self.done += 1
            r = trial.last_result or {}
            params = " ".join(f"{k.split('.')[-1]}={fmt(trial.config.get(k), 3)}" for k in study.varied_keys)
            metric = " ".join(f"{k}={fmt(r[k])}" for k in HEADLINE if k in r)
            sys.stderr.write(f"[{self.done}/{study.num_trials}] {trial.trial_id} {outcome.value:<13} {params} {metric}\n")
            sys.stderr.flush()

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._line(trial, from_ray("TERMINATED", trial.last_result or {}, study.planned_steps(trial.config)))

        def on_trial_error(self, iteration, trials, trial, **info):
            self._line(trial, Outcome.FAILED)

    return Progress()
