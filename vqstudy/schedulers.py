"""Trial schedulers a study can name in `sweep.scheduler`: one registry entry each.

An entry is a small dataclass of typed options (fields.spec: validated like every other
key, listed by `vqstudy list`) with `build(study)` returning the Ray Tune scheduler.
Ray is imported in `build` only, so validation stays fast. Adding a scheduler is one
class and one line in SCHEDULERS; `single_metric` says it stops trials on one metric
(a multi-objective study cannot use it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from .fields import spec


@dataclass
class FIFO:
    """First in, first out: every trial runs to its last step (the default)."""
    single_metric: ClassVar[bool] = False

    def build(self, study):
        from ray.tune.schedulers import FIFOScheduler

        return FIFOScheduler()


@dataclass
class ASHA:
    """Asynchronous successive halving (Li et al. 2018, arXiv 1810.05934): at each rung, stops
    trials whose `sweep.metric` is not in the best 1/reduction_factor so far."""
    single_metric: ClassVar[bool] = True
    grace_period: int = spec(1, doc="evaluations a trial runs before it can be stopped", min=1)
    reduction_factor: float = spec(2.0, doc="1/reduction_factor of the trials go on at each rung",
                                   min=1, min_exclusive=True)

    def build(self, study):
        from ray.tune.schedulers import ASHAScheduler

        max_evals = max(math.ceil(c.train.steps / c.train.eval_every) for c in study.trial_configs())
        return ASHAScheduler(time_attr="training_iteration", metric=study.sweep.metric[0],
                             mode=study.sweep.mode[0], max_t=max_evals, grace_period=self.grace_period,
                             reduction_factor=self.reduction_factor)


SCHEDULERS: dict[str, type] = {"fifo": FIFO, "asha": ASHA}


def name_of(scheduler) -> str:
    return next(name for name, cls in SCHEDULERS.items() if isinstance(scheduler, cls))
