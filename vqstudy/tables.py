"""Plain-text tables for people: the dry-run's trial list, the status table, the one
number formatter every printed table, progress line and report sentence uses, and the
names people see for trials and sweeps (MLflow run names, the parent run's summary)."""
from __future__ import annotations

import math
from typing import Any

from .catalogue import HEADLINE
from .outcome import Outcome
from .study import Study


def fmt(value: Any, digits: int = 4) -> str:
    """A value as people read it: floats to `digits` significant digits, large ones whole
    with thousands grouped (K = 1,397, not 1.4e+03); everything else as str()."""
    if isinstance(value, float):
        if math.isfinite(value) and abs(value) >= 10**digits:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


SHORT_KEYS = {"quantizer.codebook_size": "K", "model.latent_dim": "D", "train.seed": "seed"}   # in trial names


def _short(value: Any) -> str:
    """A swept value as a name shows it: 3 significant digits for floats, lists joined by commas."""
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def trial_label(study: Study, config: dict[str, Any]) -> str:
    """A trial's name (its MLflow run's): what its study varies, e.g. 'simvq K=1024 seed=0'."""
    keys = [k for k in study.varied_keys if k in config]
    keys += ["train.seed"] if "train.seed" in config and "train.seed" not in keys else []
    return " ".join(str(config[k]) if k == "quantizer.name" else f"{SHORT_KEYS.get(k, k.rsplit('.', 1)[1])}="
                    f"{_short(config[k])}" for k in keys)


def sweep_summary(study: Study) -> str:
    """One line: what the study sweeps, e.g. 'quantizer.name (vq, simvq) x quantizer.codebook_size
    (16, 64, 256, 1024) x 1 seed: 8 trials, 9,600 steps'."""
    parts = [f"{k} ({', '.join(_short(v) for v in values)})" for k, values in study.grid.items()]
    parts += [f"{k} searched" for k in (study.search.space if study.search else {})]
    seeds = study.sweep.repeats
    return (" x ".join(parts + [f"{seeds} seed{'s' if seeds > 1 else ''}"])
            + f": {study.num_trials} trials, {study.total_steps():,} steps")


def format_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """Aligned columns, one line per row (what `--dry-run` and `status` print)."""
    if not rows:
        return "(no trials)"
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def trial_table(study: Study) -> list[dict[str, Any]]:
    """One row per trial as the study will run it: grid values, seed, searched keys as distributions."""
    rows = []
    for i, point in enumerate(study.points()):
        steps = study.trial_config(point).train.steps
        for _ in range(study.samples_per_point):
            row = {"trial": len(rows), "point": i, **point}
            if study.search:
                row.update({k: str(d) for k, d in study.search.space.items()})
            rows.append({**row, "train.steps": steps})
    return rows


def status_columns(study: Study, rows: list[dict[str, Any]]) -> list[str]:
    """The status table's columns: id, outcome, retries (only when a trial crashed), the
    varied keys, the step reached and the headline metrics."""
    present = {k for r in rows for k in r}
    retried = ["failures"] if any(r.get("failures") for r in rows) else []
    return [c for c in ["trial_id", "outcome", *retried, *study.varied_keys, "step", *HEADLINE] if c in present]


def outcome_summary(rows: list[dict[str, Any]], total: int) -> str:
    """'6 finished, 1 diverged, 1 not started (of 8)'."""
    counts = {o: sum(r["outcome"] is o for r in rows) for o in Outcome}
    parts = [f"{n} {o.value.replace('_', ' ')}" for o, n in counts.items() if n]
    if total > len(rows):
        parts.append(f"{total - len(rows)} not started")
    return f"{', '.join(parts) or 'nothing'} (of {total})"
