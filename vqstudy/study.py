"""Study files: schema, validation, `search_spaces/` includes, and expansion into trials.

A study is `base` (a trial config) x `sweep` (grid points x repeats, each optionally
tuned by `num_samples` searched configurations). Everything is checked here, before Ray
starts, and every problem is one `ConfigError` line naming the file and the key. This
module imports neither Ray nor torch-heavy code, so validation and `--dry-run` are fast.

How grid and search combine: Ray cannot mix `grid_search` with a searcher such as Optuna,
so vqstudy tunes *per grid point*, as scaling-law work tunes the learning rate per model
size: each (grid point, seed) gets its own search of `num_samples` trials, with its own
Optuna study (see vqstudy/search.py). A study with no `search` runs each point once.
"""
from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ConfigError, TrialConfig, coerce, flatten, load_yaml, split_key

STUDY_KEYS = ("name", "description", "base", "sweep", "resources", "tracking")
SWEEP_KEYS = ("include", "grid", "repeats", "search", "scheduler", "metric", "mode", "max_failures",
              "checkpoint_interval_s")
SEARCH_SETTINGS = ("algorithm", "num_samples", "sampler")
ALGORITHMS = ("random", "optuna")
SAMPLERS = ("tpe", "nsga2", "random")
DISTRIBUTIONS = ("loguniform", "uniform", "int", "choice")
SCHEDULERS = ("fifo", "asha")
RESOURCE_KEYS = ("cpu", "gpu", "max_concurrent")
TRACKING_KEYS = ("experiment", "artifacts")
METRICS = ("recon_mse", "psnr", "utilization", "perplexity", "normalized_entropy", "dead_codes",
           "quant_error", "effective_dim", "codebook_effective_dim", "train_loss")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


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
    algorithm: str = "random"
    num_samples: int = 1
    sampler: str = "tpe"                       # optuna only; nsga2 for multi-objective
    space: dict[str, Distribution] = field(default_factory=dict)


@dataclass
class Scheduler:
    name: str = "fifo"
    grace_period: int = 1                      # in evaluations (train.eval_every steps each)
    reduction_factor: float = 2.0


@dataclass
class Resources:
    cpu: float = 1.0
    gpu: float = 0.0                           # fractional: 0.25 packs four trials on a GPU
    max_concurrent: int | None = None


@dataclass
class Study:
    name: str
    path: Path | None
    base: TrialConfig
    description: str = ""
    grid: dict[str, list] = field(default_factory=dict)
    repeats: int = 1
    search: Search | None = None
    scheduler: Scheduler = field(default_factory=Scheduler)
    metric: list[str] = field(default_factory=lambda: ["recon_mse"])
    mode: list[str] = field(default_factory=lambda: ["min"])
    max_failures: int = 2
    checkpoint_interval_s: float = 10.0        # Tune persists a trial's checkpoint at most this often
    resources: Resources = field(default_factory=Resources)
    experiment: str = ""
    artifacts: bool = True

    # -- expansion ------------------------------------------------------------------
    def points(self) -> list[dict[str, Any]]:
        """The grid's cartesian product x repeats (train.seed = base seed + repeat), in order."""
        keys = list(self.grid)
        seeds = [self.base.train.seed + r for r in range(self.repeats)]
        points = []
        for values in itertools.product(*(self.grid[k] for k in keys)):
            for seed in seeds:
                points.append({**dict(zip(keys, values)), "train.seed": seed})
        return points

    @property
    def varied_keys(self) -> list[str]:
        """The keys that differ between trials: gridded, searched, and the seed when repeated."""
        keys = list(self.grid) + list(self.search.space if self.search else [])
        return keys + (["train.seed"] if self.repeats > 1 and "train.seed" not in keys else [])

    @property
    def samples_per_point(self) -> int:
        return self.search.num_samples if self.search else 1

    @property
    def num_trials(self) -> int:
        return len(self.points()) * self.samples_per_point

    def trial_config(self, params: dict[str, Any]) -> TrialConfig:
        return self.base.updated(params, source=self.source)

    def total_steps(self) -> int:
        return sum(self.trial_config(p).train.steps for p in self.points()) * self.samples_per_point

    @property
    def multi_objective(self) -> bool:
        return len(self.metric) > 1

    @property
    def source(self) -> str:
        return str(self.path) if self.path else self.name


# -- loading ------------------------------------------------------------------------------
def _require_mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def _check_keys(d: dict, allowed: tuple[str, ...], where: str) -> None:
    for key in d:
        if key not in allowed:
            raise ConfigError(f"{where}.{key}: unknown key (allowed: {', '.join(allowed)})")


def _number(value: Any, where: str, *, integer: bool = False, minimum: float | None = None,
            exclusive: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and integer and not float(value).is_integer():
        ok = False
    if not ok:
        raise ConfigError(f"{where}: {value!r} is not a valid {'int' if integer else 'number'}")
    if minimum is not None and (value < minimum or (exclusive and value == minimum)):
        raise ConfigError(f"{where}: {value!r} is out of range (must be {'>' if exclusive else '>='} {minimum})")
    return int(value) if integer else float(value)


def _find_include(name: str, study_path: Path | None, src: str) -> Path:
    """search_spaces/NAME.yaml next to the study's folder, in it, or under the working directory."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ConfigError(f"{src}: sweep.include: {name!r} is not a fragment name (e.g. codebook_sizes)")
    roots = [study_path.parent.parent, study_path.parent] if study_path else []
    candidates = [r / "search_spaces" / f"{name}.yaml" for r in roots] + [Path("search_spaces") / f"{name}.yaml"]
    for c in candidates:
        if c.exists():
            return c
    raise ConfigError(f"{src}: sweep.include: no fragment {name!r} (looked for {candidates[0]})")


def _merge_includes(sweep: dict, src: str, study_path: Path | None) -> dict:
    """Fragments first, then the study's own sweep keys on top (grid and search merged key by key)."""
    names = sweep.get("include") or []
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, list):
        raise ConfigError(f"{src}: sweep.include: expected a name or a list of names")
    merged: dict[str, Any] = {}
    for name in names:
        path = _find_include(name, study_path, src)
        fragment = _require_mapping(load_yaml(path), str(path))
        _check_keys(fragment, tuple(k for k in SWEEP_KEYS if k != "include"), f"{path}: sweep")
        merged = _merge(merged, fragment)
    own = {k: v for k, v in sweep.items() if k != "include"}
    return _merge(merged, own)


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = {**out[k], **v} if k in ("grid", "search") and isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _parse_grid(grid: Any, src: str) -> dict[str, list]:
    grid = _require_mapping(grid, f"{src}: sweep.grid")
    out = {}
    for key, values in flatten(grid, f"{src}: sweep.grid").items():
        split_key(key, f"{src}: sweep.grid")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{src}: sweep.grid.{key}: expected a non-empty list of values")
        out[key] = [coerce(key, v, f"{src}: sweep.grid") for v in values]
    return out


def _parse_distribution(key: str, spec: Any, src: str) -> Distribution:
    where = f"{src}: sweep.search.{key}"
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: expected one of {{{', '.join(d + ': ...' for d in DISTRIBUTIONS)}}}")
    kind, args = next(iter(spec.items()))
    if not isinstance(args, list) or not args:
        raise ConfigError(f"{where}.{kind}: expected a list")
    if kind == "choice":
        return Distribution(kind, tuple(coerce(key, a, f"{src}: sweep.search") for a in args))
    if len(args) != 2:
        raise ConfigError(f"{where}.{kind}: expected [low, high]")
    lo, hi = (coerce(key, a, f"{src}: sweep.search") for a in args)
    if isinstance(lo, bool) or not isinstance(lo, (int, float)):
        raise ConfigError(f"{where}.{kind}: {key} is not numeric; use choice")
    if kind == "int" and not (isinstance(lo, int) and isinstance(hi, int)):
        raise ConfigError(f"{where}.int: {key} takes floats; use uniform or loguniform")
    if not lo < hi:
        raise ConfigError(f"{where}.{kind}: low {lo} must be below high {hi}")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"{where}.loguniform: low must be > 0")
    return Distribution(kind, (lo, hi))


def _parse_search(search: Any, src: str) -> Search | None:
    if search is None:
        return None
    search = _require_mapping(search, f"{src}: sweep.search")
    out = Search()
    for key, value in search.items():
        if key == "algorithm":
            if value not in ALGORITHMS:
                raise ConfigError(f"{src}: sweep.search.algorithm: {value!r} is not one of {', '.join(ALGORITHMS)}")
            out.algorithm = value
        elif key == "sampler":
            if value not in SAMPLERS:
                raise ConfigError(f"{src}: sweep.search.sampler: {value!r} is not one of {', '.join(SAMPLERS)}")
            out.sampler = value
        elif key == "num_samples":
            out.num_samples = _number(value, f"{src}: sweep.search.num_samples", integer=True, minimum=1)
        elif "." in key:
            split_key(key, f"{src}: sweep.search")
            out.space[key] = _parse_distribution(key, value, src)
        else:
            raise ConfigError(f"{src}: sweep.search.{key}: unknown key (allowed: {', '.join(SEARCH_SETTINGS)} "
                              f"and dotted config keys such as train.lr)")
    if not out.space:
        raise ConfigError(f"{src}: sweep.search: no searched keys (e.g. train.lr: {{loguniform: [1.0e-4, 1.0e-2]}})")
    return out


def _parse_scheduler(value: Any, src: str) -> Scheduler:
    if value is None or isinstance(value, str):
        value = {"name": value or "fifo"}
    value = _require_mapping(value, f"{src}: sweep.scheduler")
    _check_keys(value, ("name", "grace_period", "reduction_factor"), f"{src}: sweep.scheduler")
    s = Scheduler(name=value.get("name", "fifo"))
    if s.name not in SCHEDULERS:
        raise ConfigError(f"{src}: sweep.scheduler.name: {s.name!r} is not one of {', '.join(SCHEDULERS)}")
    if "grace_period" in value:
        s.grace_period = _number(value["grace_period"], f"{src}: sweep.scheduler.grace_period", integer=True, minimum=1)
    if "reduction_factor" in value:
        s.reduction_factor = _number(value["reduction_factor"], f"{src}: sweep.scheduler.reduction_factor",
                                     minimum=1, exclusive=True)
    return s


def _as_list(value: Any, default: list[str]) -> list[str]:
    if value is None:
        return default
    return value if isinstance(value, list) else [value]


def _parse_objectives(sweep: dict, src: str) -> tuple[list[str], list[str]]:
    metric = _as_list(sweep.get("metric"), ["recon_mse"])
    mode = _as_list(sweep.get("mode"), ["min"] * len(metric))
    for m in metric:
        if m not in METRICS:
            raise ConfigError(f"{src}: sweep.metric: {m!r} is not one of {', '.join(METRICS)}")
    for m in mode:
        if m not in ("min", "max"):
            raise ConfigError(f"{src}: sweep.mode: {m!r} is not one of min, max")
    if len(mode) != len(metric):
        raise ConfigError(f"{src}: sweep.mode: {len(mode)} mode(s) for {len(metric)} metric(s); give one per metric")
    return metric, mode


def _parse_resources(value: Any, src: str) -> Resources:
    value = _require_mapping(value, f"{src}: resources")
    _check_keys(value, RESOURCE_KEYS, f"{src}: resources")
    r = Resources()
    if "cpu" in value:
        r.cpu = _number(value["cpu"], f"{src}: resources.cpu", minimum=0, exclusive=True)
    if "gpu" in value:
        r.gpu = _number(value["gpu"], f"{src}: resources.gpu", minimum=0)
        if r.gpu > 1 and not r.gpu.is_integer():
            raise ConfigError(f"{src}: resources.gpu: {r.gpu} (a fraction must be <= 1; above 1, whole GPUs)")
    if value.get("max_concurrent") is not None:
        r.max_concurrent = _number(value["max_concurrent"], f"{src}: resources.max_concurrent", integer=True, minimum=1)
    return r


def parse_study(raw: Any, path: Path | None = None, overrides: dict[str, Any] | None = None) -> Study:
    """Validate a loaded study mapping; `overrides` (dotted keys) apply to `base`."""
    src = str(path) if path else "study"
    raw = _require_mapping(raw, src)
    _check_keys(raw, STUDY_KEYS, src)
    name = raw.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ConfigError(f"{src}: name: required, letters, digits, '_', '-', '.' (got {name!r})")
    description = raw.get("description") or ""
    if not isinstance(description, str):
        raise ConfigError(f"{src}: description: expected text")

    base = TrialConfig().updated(flatten(_require_mapping(raw.get("base"), f"{src}: base"), f"{src}: base"),
                                 f"{src}: base")
    if overrides:
        base = base.updated(overrides, "--set")

    sweep = _merge_includes(_require_mapping(raw.get("sweep"), f"{src}: sweep"), src, path)
    _check_keys(sweep, SWEEP_KEYS, f"{src}: sweep")
    metric, mode = _parse_objectives(sweep, src)
    tracking = _require_mapping(raw.get("tracking"), f"{src}: tracking")
    _check_keys(tracking, TRACKING_KEYS, f"{src}: tracking")
    study = Study(
        name=name, path=path, base=base, description=description,
        grid=_parse_grid(sweep.get("grid"), src),
        repeats=_number(sweep.get("repeats", 1), f"{src}: sweep.repeats", integer=True, minimum=1),
        search=_parse_search(sweep.get("search"), src),
        scheduler=_parse_scheduler(sweep.get("scheduler"), src),
        metric=metric, mode=mode,
        max_failures=_number(sweep.get("max_failures", 2), f"{src}: sweep.max_failures", integer=True, minimum=0),
        checkpoint_interval_s=_number(sweep.get("checkpoint_interval_s", 10.0), f"{src}: sweep.checkpoint_interval_s",
                                      minimum=0),
        resources=_parse_resources(raw.get("resources"), src),
        experiment=str(tracking.get("experiment") or name),
        artifacts=bool(tracking.get("artifacts", True)),
    )
    _check_cross_rules(study, src)
    return study


def _check_cross_rules(study: Study, src: str) -> None:
    if "train.seed" in study.grid and study.repeats > 1:
        raise ConfigError(f"{src}: sweep.grid.train.seed: conflicts with sweep.repeats (both set the seed); use one")
    if study.search:
        both = sorted(set(study.search.space) & set(study.grid))
        if both:
            raise ConfigError(f"{src}: sweep.search.{both[0]}: also in sweep.grid; a key is either gridded or searched")
        if study.multi_objective and study.search.algorithm != "optuna":
            raise ConfigError(f"{src}: sweep.metric: several metrics need sweep.search.algorithm: optuna")
    elif study.multi_objective:
        raise ConfigError(f"{src}: sweep.metric: several metrics need a sweep.search (algorithm: optuna)")
    if study.scheduler.name == "asha" and study.multi_objective:
        raise ConfigError(f"{src}: sweep.scheduler: asha stops trials on one metric; give a single sweep.metric")
    for point in study.points():  # every grid combination must be a valid trial
        study.trial_config(point)


def load_study(path: str | Path, overrides: dict[str, Any] | None = None) -> Study:
    path = Path(path)
    return parse_study(load_yaml(path), path, overrides)


# -- the dry-run table --------------------------------------------------------------------------
def trial_table(study: Study) -> list[dict[str, Any]]:
    """One row per trial as the study will run it: grid values, seed, searched keys as distributions."""
    rows = []
    for i, point in enumerate(study.points()):
        for s in range(study.samples_per_point):
            row = {"trial": len(rows), "point": i, **point}
            if study.search:
                row.update({k: str(d) for k, d in study.search.space.items()})
            row["train.steps"] = study.trial_config(point).train.steps
            rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """Plain aligned text table (what `--dry-run` and `status` print)."""
    if not rows:
        return "(no trials)"
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    cells = [[_cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _cell(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
