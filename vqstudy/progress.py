"""What a running study prints on stderr: one line per trial that ends, with its outcome,
its swept keys and its headline metrics (a Tune Callback on the driver)."""
from __future__ import annotations

import sys

from .catalogue import HEADLINE
from .outcome import Outcome, from_ray
from .study import Study
from .tables import fmt
from .trainable import unpack


def progress_callback(study: Study):
    """The Callback (defined here: subclassing needs Ray)."""
    from ray.tune import Callback

    class Progress(Callback):
        def _line(self, trials, trial, outcome: Outcome) -> None:
            """Counted from Tune's trials, so that a resumed study goes on counting where it was."""
            done = 1 + sum(1 for t in trials if t is not trial and t.is_finished())
            r = unpack(trial.last_result or {})
            params = " ".join(f"{k.split('.')[-1]}={fmt(trial.config.get(k), 3)}" for k in study.varied_keys)
            metric = " ".join(f"{k}={fmt(r[k])}" for k in HEADLINE if k in r)
            sys.stderr.write(f"[{done}/{study.num_trials}] {trial.trial_id} {outcome.value:<13} {params} {metric}\n")
            sys.stderr.flush()

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._line(trials, trial, from_ray("TERMINATED", trial.last_result or {}, study.planned_steps(trial.config)))

        def on_trial_error(self, iteration, trials, trial, **info):
            self._line(trials, trial, Outcome.FAILED)

    return Progress()
