"""Reusable sweep fragments: `sweep.include: NAME` pulls `search_spaces/NAME.yaml` (any sweep
keys) under a study's own sweep. Fragments merge in order, then the study's keys on top;
`grid` and `search` merge key by key, so a study can add a key to an included grid.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .fields import check_keys, load_yaml, require_mapping

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")   # fragment (and study) names: fullmatch (`$` lets "x\n" through)


def find_include(name: str, study_path: Path | None, src: str) -> Path:
    """search_spaces/NAME.yaml next to the study's folder, in it, or under the working directory."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ConfigError(f"{src}: sweep.include: {name!r} is not a fragment name (e.g. codebook_sizes)")
    roots = [study_path.parent.parent, study_path.parent] if study_path else []
    candidates = [r / "search_spaces" / f"{name}.yaml" for r in roots] + [Path("search_spaces") / f"{name}.yaml"]
    for c in candidates:
        if c.exists():
            return c
    raise ConfigError(f"{src}: sweep.include: no fragment {name!r} (looked for {candidates[0]})")


def merge_includes(sweep: dict, src: str, study_path: Path | None, fragment_keys: tuple[str, ...]) -> dict:
    """Fragments first, then the study's own sweep keys on top (grid and search merged key by key)."""
    names = sweep.get("include") or []
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, list):
        raise ConfigError(f"{src}: sweep.include: expected a name or a list of names")
    merged: dict[str, Any] = {}
    for name in names:
        path = find_include(name, study_path, src)
        fragment = require_mapping(load_yaml(path), str(path))
        check_keys(fragment, fragment_keys, f"{path}: sweep")
        merged = _merge(merged, fragment)
    return _merge(merged, {k: v for k, v in sweep.items() if k != "include"})


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        both = k in ("grid", "search") and isinstance(v, dict) and isinstance(out.get(k), dict)
        out[k] = {**out[k], **v} if both else v
    return out
