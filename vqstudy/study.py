"""Study files: schema, validation, `search_spaces/` includes, and expansion into trials.

A study is `base` (a trial config) x `sweep` (grid points x repeats, each optionally
tuned by `num_samples` searched configurations). The schema's sections are typed-field
dataclasses (fields.py), the same machinery as trial configs, so every problem is one
`ConfigError` line naming the file and the key; `to_raw()` writes a study back as the
file that parses to it. Everything is checked here, before Ray starts; this module
imports neither Ray nor torch, so validation and `--dry-run` are fast. Grid and search
combine per grid point: each (point, seed) gets its own search (see search.py).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .catalogue import OBJECTIVES
from .config import TrialConfig, coerce, split_key
from .errors import ConfigError
from .fields import check_keys, flatten, load_yaml, parse_section, require_mapping, section_dict, spec, user_fields
from .fragments import NAME_RE, merge_includes
from .schedulers import FIFO, SCHEDULERS, name_of

STUDY_KEYS = ("name", "description", "base", "sweep", "resources", "tracking")
DISTRIBUTIONS = ("loguniform", "uniform", "int", "choice")


@dataclass
class SweepSettings:
    repeats: int = spec(1, doc="seeds per point: train.seed = base seed, +1, +2, ...", min=1)
    metric: tuple[str, ...] = spec(("recon_mse",), doc="what a search optimizes and a scheduler stops on",
                                   choices=OBJECTIVES)
    mode: tuple[str, ...] | None = spec(None, doc="min or max, one per metric (default: min)", choices=("min", "max"))
    max_failures: int = spec(2, doc="retries of a crashed trial from its last checkpoint", min=0)
    checkpoint_interval_s: float = spec(10.0, doc="a trial's checkpoint is persisted at most this often", min=0)


_STRUCTURED = ("include", "grid", "search", "scheduler")   # sweep keys with rules of their own
SWEEP_KEYS = (*_STRUCTURED, *(f.name for f in user_fields(SweepSettings)))


@dataclass
class Resources:
    cpu: float = spec(1.0, doc="CPUs per trial (its torch threads)", min=0, min_exclusive=True)
    gpu: float = spec(0.0, doc="GPUs per trial; 0.25 packs four trials on a GPU", min=0)
    max_concurrent: int | None = spec(None, doc="at most this many trials at once (default: as many as fit)", min=1)


@dataclass
class TrackingSettings:
    experiment: str | None = spec(None, doc="MLflow experiment (default: the study name)")
    artifacts: bool = spec(True, doc="log the per-trial figures")


@dataclass(frozen=True)
class Distribution:
    """One searched key: `{loguniform: [lo, hi]}`, `{uniform: [lo, hi]}`, `{int: [lo, hi]}`
    (both ends included) or `{choice: [a, b, ...]}`."""
    kind: str
    args: tuple

    def __str__(self) -> str:
        return f"~{self.kind}({', '.join(map(str, self.args))})"


@dataclass
class Search:
    algorithm: str = spec("random", doc="random, or optuna (a sampler per grid point)", choices=("random", "optuna"))
    num_samples: int = spec(1, doc="searched configurations per grid point and seed", min=1)
    sampler: str = spec("tpe", doc="optuna's sampler; nsga2 for several metrics", choices=("tpe", "nsga2", "random"))
    space: dict[str, Distribution] = field(default_factory=dict)   # dotted key -> distribution


@dataclass
class Study:
    name: str
    path: Path | None
    base: TrialConfig
    description: str = ""
    grid: dict[str, list] = field(default_factory=dict)
    search: Search | None = None
    scheduler: Any = field(default_factory=FIFO)       # an entry of schedulers.SCHEDULERS
    sweep: SweepSettings = field(default_factory=SweepSettings)
    resources: Resources = field(default_factory=Resources)
    tracking: TrackingSettings = field(default_factory=TrackingSettings)

    # -- expansion ------------------------------------------------------------------
    def points(self) -> list[dict[str, Any]]:
        """The grid's cartesian product x repeats (train.seed = base seed + repeat), in order."""
        keys = list(self.grid)
        seeds = [self.base.train.seed + r for r in range(self.sweep.repeats)]
        return [{**dict(zip(keys, values)), "train.seed": seed}
                for values in itertools.product(*(self.grid[k] for k in keys)) for seed in seeds]

    def trial_config(self, params: dict[str, Any]) -> TrialConfig:
        return self.base.updated(params, source=self.source)

    def planned_steps(self, trial_keys: dict[str, Any]) -> int:
        """train.steps of the trial whose swept keys are `trial_keys`: the base's unless it sweeps
        them. No config is built: the driver asks this for every trial that ends, and the
        swept values were validated with the study."""
        steps = trial_keys.get("train.steps")
        return self.base.train.steps if steps is None else int(steps)

    def trial_configs(self) -> Iterator[TrialConfig]:
        """The config of every point (searched keys at their base values)."""
        return (self.trial_config(p) for p in self.points())

    @property
    def varied_keys(self) -> list[str]:
        """The keys that differ between trials: gridded, searched, and the seed when repeated."""
        keys = list(self.grid) + list(self.search.space if self.search else [])
        return keys + (["train.seed"] if self.sweep.repeats > 1 and "train.seed" not in keys else [])

    @property
    def samples_per_point(self) -> int:
        return self.search.num_samples if self.search else 1

    @property
    def num_trials(self) -> int:
        return len(self.points()) * self.samples_per_point

    def total_steps(self) -> int:
        return sum(c.train.steps for c in self.trial_configs()) * self.samples_per_point

    @property
    def multi_objective(self) -> bool:
        return len(self.sweep.metric) > 1

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or self.name

    @property
    def source(self) -> str:
        return str(self.path) if self.path else self.name

    def to_raw(self) -> dict[str, Any]:
        """The resolved study as a study file (what a study folder's study.yaml holds)."""
        sweep: dict[str, Any] = {"grid": self.grid, **section_dict(self.sweep),
                                 "scheduler": {"name": name_of(self.scheduler), **section_dict(self.scheduler)}}
        if self.search:
            sweep["search"] = {**section_dict(self.search),
                               **{k: {d.kind: list(d.args)} for k, d in self.search.space.items()}}
        return {"name": self.name, "description": self.description, "base": self.base.to_dict(), "sweep": sweep,
                "resources": section_dict(self.resources), "tracking": section_dict(self.tracking)}


# -- loading ------------------------------------------------------------------------------
def _parse_grid(grid: Any, src: str) -> dict[str, list]:
    grid = require_mapping(grid, f"{src}: sweep.grid")
    out = {}
    for key, values in flatten(grid, f"{src}: sweep.grid").items():
        split_key(key, f"{src}: sweep.grid")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{src}: sweep.grid.{key}: expected a non-empty list of values")
        out[key] = [coerce(key, v, f"{src}: sweep.grid") for v in values]
    return out


def _parse_distribution(key: str, spec_: Any, src: str) -> Distribution:
    where = f"{src}: sweep.search.{key}"
    if not isinstance(spec_, dict) or len(spec_) != 1 or next(iter(spec_)) not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: expected one of {{{', '.join(d + ': ...' for d in DISTRIBUTIONS)}}}")
    kind, args = next(iter(spec_.items()))
    if not isinstance(args, list) or not args:
        raise ConfigError(f"{where}.{kind}: expected a list")
    values = tuple(coerce(key, a, f"{src}: sweep.search") for a in args)
    if kind == "choice":
        return Distribution(kind, values)
    if len(values) != 2:
        raise ConfigError(f"{where}.{kind}: expected [low, high]")
    lo, hi = values
    if isinstance(lo, bool) or not isinstance(lo, (int, float)):
        raise ConfigError(f"{where}.{kind}: {key} is not numeric; use choice")
    if kind == "int" and not (isinstance(lo, int) and isinstance(hi, int)):
        raise ConfigError(f"{where}.int: {key} takes floats; use uniform or loguniform")
    if not lo < hi:
        raise ConfigError(f"{where}.{kind}: low {lo} must be below high {hi}")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"{where}.loguniform: low must be > 0")
    return Distribution(kind, (lo, hi))


def _parse_search(raw: Any, src: str) -> Search | None:
    if raw is None:
        return None
    raw = require_mapping(raw, f"{src}: sweep.search")
    settings = {k: v for k, v in raw.items() if "." not in str(k)}
    for key in settings:
        if key not in ("algorithm", "num_samples", "sampler"):
            raise ConfigError(f"{src}: sweep.search.{key}: unknown key (allowed: algorithm, num_samples, sampler "
                              f"and dotted config keys such as train.lr)")
    search = parse_section(Search, settings, f"{src}: sweep.search")
    for key in (k for k in raw if "." in str(k)):
        split_key(key, f"{src}: sweep.search")
        search.space[key] = _parse_distribution(key, raw[key], src)
    if not search.space:
        raise ConfigError(f"{src}: sweep.search: no searched keys (e.g. train.lr: {{loguniform: [1.0e-4, 1.0e-2]}})")
    return search


def _parse_scheduler(value: Any, src: str):
    if value is None or isinstance(value, str):
        value = {"name": value or "fifo"}
    options = dict(require_mapping(value, f"{src}: sweep.scheduler"))
    name = options.pop("name", "fifo")
    if name not in SCHEDULERS:
        raise ConfigError(f"{src}: sweep.scheduler.name: {name!r} is not one of {', '.join(SCHEDULERS)}")
    return parse_section(SCHEDULERS[name], options, f"{src}: sweep.scheduler")


def _parse_sweep(raw: dict, src: str) -> dict[str, Any]:
    """The sweep section's parts: grid, search and scheduler by their own rules, the rest as fields."""
    check_keys(raw, SWEEP_KEYS, f"{src}: sweep")
    settings = parse_section(SweepSettings, {k: v for k, v in raw.items() if k not in _STRUCTURED},
                             f"{src}: sweep")
    settings.mode = settings.mode or ("min",) * len(settings.metric)
    if len(settings.mode) != len(settings.metric):
        raise ConfigError(f"{src}: sweep.mode: {len(settings.mode)} mode(s) for {len(settings.metric)} metric(s); "
                          f"give one per metric")
    return {"grid": _parse_grid(raw.get("grid"), src), "search": _parse_search(raw.get("search"), src),
            "scheduler": _parse_scheduler(raw.get("scheduler"), src), "sweep": settings}


MAX_POINTS = 100_000   # trials per study: 20x the size the scale bench measures


def parse_study(raw: Any, path: Path | None = None, overrides: dict[str, Any] | None = None) -> Study:
    """Validate a loaded study mapping; `overrides` (dotted keys) apply to `base`."""
    src = str(path) if path else "study"
    raw = require_mapping(raw, src)
    check_keys(raw, STUDY_KEYS, src)
    name = raw.get("name")
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ConfigError(f"{src}: name: required, letters, digits, '_', '-', '.' (got {name!r})")
    description = raw.get("description") or ""
    if not isinstance(description, str):
        raise ConfigError(f"{src}: description: expected text")
    base = TrialConfig().updated(flatten(require_mapping(raw.get("base"), f"{src}: base"), f"{src}: base"),
                                 f"{src}: base")
    if overrides:
        base = base.updated(overrides, "--set")
    sweep = merge_includes(require_mapping(raw.get("sweep"), f"{src}: sweep"), src, path,
                           tuple(k for k in SWEEP_KEYS if k != "include"))
    study = Study(name=name, path=path, base=base, description=description, **_parse_sweep(sweep, src),
                  resources=parse_section(Resources, raw.get("resources"), f"{src}: resources"),
                  tracking=parse_section(TrackingSettings, raw.get("tracking"), f"{src}: tracking"))
    for key in sorted(set(overrides or {}) & {*study.grid, *(study.search.space if study.search else ())}):
        raise ConfigError(f"--set: {key}: {src} sweeps this key (sweep.{'grid' if key in study.grid else 'search'}); "
                          f"change its values there")
    _check_cross_rules(study, src)
    return study


def _check_cross_rules(study: Study, src: str) -> None:
    gpu = study.resources.gpu
    if gpu > 1 and not gpu.is_integer():
        raise ConfigError(f"{src}: resources.gpu: {gpu} (a fraction must be <= 1; above 1, whole GPUs)")
    if "train.seed" in study.grid and study.sweep.repeats > 1:
        raise ConfigError(f"{src}: sweep.grid.train.seed: conflicts with sweep.repeats (both set the seed); use one")
    if study.search:
        both = sorted(set(study.search.space) & set(study.grid))
        if both:
            raise ConfigError(f"{src}: sweep.search.{both[0]}: also in sweep.grid; a key is either gridded or searched")
        if study.multi_objective and study.search.algorithm != "optuna":
            raise ConfigError(f"{src}: sweep.metric: several metrics need sweep.search.algorithm: optuna")
    elif study.multi_objective:
        raise ConfigError(f"{src}: sweep.metric: several metrics need a sweep.search (algorithm: optuna)")
    if study.scheduler.single_metric and study.multi_objective:
        raise ConfigError(f"{src}: sweep.scheduler: {name_of(study.scheduler)} stops trials on one metric; "
                          f"give a single sweep.metric")
    _check_grid_size(study, src)
    for point in study.points():  # every grid combination must be a valid trial
        cfg = study.trial_config(point)
        device = cfg.train.device
        if device.startswith("cuda") and gpu == 0:
            raise ConfigError(f"{src}: train.device: {device} but resources.gpu is 0 (a trial sees no GPU "
                              f"it was not given); set resources.gpu, or train.device: auto")
        if device.startswith("cuda:") and int(device[5:]) >= (n := max(1, math.ceil(gpu))):
            raise ConfigError(f"{src}: train.device: {device} but a trial sees {n} GPU{'s' if n > 1 else ''} (cuda:0"
                              f"{f' to cuda:{n - 1}' if n > 1 else ''}: Ray numbers a trial's own GPUs from 0); "
                              f"use cuda or auto")


def _check_grid_size(study: Study, src: str) -> None:
    """A grid too large to run is said by its size, before it is expanded."""
    sizes = [len(v) for v in study.grid.values()] + [study.sweep.repeats]
    points = math.prod(sizes)
    if points > MAX_POINTS:
        shape = " x ".join(f"{n:,}" for n in sizes)
        raise ConfigError(f"{src}: sweep.grid: {points:,} points ({shape}, repeats last); a study holds at most "
                          f"{MAX_POINTS:,}: split it into several studies")


def load_study(path: str | Path, overrides: dict[str, Any] | None = None) -> Study:
    path = Path(path)
    return parse_study(load_yaml(path), path, overrides)
