"""The per-grid-point search: one Ray Tune `Searcher` that holds an Optuna study per
(grid point, seed).

Ray cannot mix `grid_search` with a searcher such as OptunaSearch, and one search across
grid points would let one point's optimum steer another's. Scaling-law work tunes per
size (the learning rate per model size), so each point gets its own Optuna study --
random, TPE or NSGA-II -- of `num_samples` trials, and points are handed out round-robin so
that concurrent trials spread over the grid. A study without `search` runs each point once.
`PerPointPlan` holds that logic without Ray; `make_searcher` wraps it in Ray's interface.
Ray and Optuna are imported only when a searcher is made.
"""
from __future__ import annotations

import math
import pickle

from .outcome import Outcome
from .study import Study


def _optuna_distribution(d):
    import optuna

    lo, *rest = d.args
    if d.kind == "loguniform":
        return optuna.distributions.FloatDistribution(lo, rest[0], log=True)
    if d.kind == "uniform":
        return optuna.distributions.FloatDistribution(lo, rest[0])
    if d.kind == "int":
        return optuna.distributions.IntDistribution(lo, rest[0])
    return optuna.distributions.CategoricalDistribution(list(d.args))


class PerPointPlan:
    """Yields every grid point x seed, each with `num_samples` configurations from its own
    Optuna study (random, TPE or NSGA-II sampler), round-robin across points so that
    concurrent trials spread over the grid. Without a search, each point once."""

    def __init__(self, study: Study):
        self.points = study.points()
        self.samples = study.samples_per_point
        self.objectives = list(zip(study.sweep.metric, study.sweep.mode))
        self.space = {k: _optuna_distribution(d) for k, d in (study.search.space.items() if study.search else [])}
        self.studies = [self._new_study(study, i) for i in range(len(self.points))] if self.space else []
        self.issued = [0] * len(self.points)
        self.cursor = 0
        self.pending: dict[str, tuple[int, int | None]] = {}   # trial id -> (point, optuna trial number)

    def _new_study(self, study: Study, i: int):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        seed = study.base.train.seed * 100_003 + i
        kind = "random" if study.search.algorithm == "random" else study.search.sampler
        sampler = {"random": optuna.samplers.RandomSampler, "tpe": optuna.samplers.TPESampler,
                   "nsga2": optuna.samplers.NSGAIISampler}[kind](seed=seed)
        directions = ["minimize" if m == "min" else "maximize" for m in study.sweep.mode]
        return optuna.create_study(directions=directions, sampler=sampler)

    def suggest(self, trial_id: str) -> dict | None:
        """The next trial's keys, or None when every point has all its samples."""
        for _ in range(len(self.points)):
            i, self.cursor = self.cursor, (self.cursor + 1) % len(self.points)
            if self.issued[i] < self.samples:
                self.issued[i] += 1
                params, number = {}, None
                if self.space:
                    trial = self.studies[i].ask(self.space)
                    params, number = trial.params, trial.number
                self.pending[trial_id] = (i, number)
                return {**self.points[i], **params}
        return None

    def complete(self, trial_id: str, result: dict | None, error: bool) -> None:
        """Tell the point's Optuna study how its trial did (a failed or diverged trial as FAIL)."""
        import optuna

        i, number = self.pending.pop(trial_id, (None, None))
        if number is None:
            return
        values = [result.get(m) if result else None for m, _ in self.objectives]
        ok = not error and result and result.get("outcome") != Outcome.DIVERGED.value and all(
            isinstance(v, (int, float)) and math.isfinite(v) for v in values)
        if ok:
            self.studies[i].tell(number, values)
        else:
            self.studies[i].tell(number, state=optuna.trial.TrialState.FAIL)


def make_searcher(study: Study):
    """A Ray Tune Searcher over `PerPointPlan(study)` (defined here: subclassing needs Ray)."""
    from ray.tune.search import Searcher

    class PerPointSearcher(Searcher):
        def __init__(self, plan: PerPointPlan):
            super().__init__(metric=None, mode=None)
            self.plan = plan

        def set_search_properties(self, metric, mode, config, **spec) -> bool:
            return True

        def suggest(self, trial_id: str):
            config = self.plan.suggest(trial_id)
            return Searcher.FINISHED if config is None else config

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            self.plan.complete(trial_id, result, error)

        def save(self, checkpoint_path: str) -> None:
            with open(checkpoint_path, "wb") as f:
                pickle.dump(self.plan, f)

        def restore(self, checkpoint_path: str) -> None:
            with open(checkpoint_path, "rb") as f:
                self.plan = pickle.load(f)

    return PerPointSearcher(PerPointPlan(study))
