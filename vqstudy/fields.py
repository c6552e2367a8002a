"""Typed fields: small dataclasses whose fields carry their documentation and allowed values.

The trial config (config.py), the study file's sections (study.py) and the scheduler
options (schedulers.py) are all built from these, so one coercion and one error format
serve every key a user can write: a bad value is one `ConfigError` line naming where it
was written, the key and what is allowed. Nothing here imports torch or Ray.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


def spec(default, *, doc: str, min=None, max=None, choices=None, min_exclusive=False, max_exclusive=False):
    """A dataclass field with its documentation and allowed values, read by `coerce` and `describe`."""
    meta = {"doc": doc, "min": min, "max": max, "choices": choices, "min_exclusive": min_exclusive,
            "max_exclusive": max_exclusive}
    return dataclasses.field(default=default, metadata=meta)


# -- values -------------------------------------------------------------------------------------
_NONE_WORDS = {"none", "null", "~", ""}
_BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True,
               "false": False, "no": False, "off": False, "0": False}


@functools.lru_cache(maxsize=None)
def base_type(annotation) -> tuple[type, bool]:
    """(the non-None type, whether None is allowed) of a field annotation such as 'int | None'."""
    tp = eval(annotation, {"int": int, "float": float, "str": str, "bool": bool}) \
        if isinstance(annotation, str) else annotation  # annotations are postponed strings
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return tp, False


def _cast(value: Any, tp: type) -> Any:
    """Convert `value` to `tp`, accepting the spellings YAML and a shell produce. Raises ValueError."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.lower()]
        raise ValueError
    if tp is int:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            number = float(value)  # accepts '1e3' and '1024'
            if number.is_integer():
                return int(number)
        raise ValueError
    if tp is float:
        if isinstance(value, bool):
            raise ValueError
        return float(value)  # int, float, or a string such as '3e-4'
    if tp is str:
        if isinstance(value, str) and value:
            return value
        raise ValueError
    if typing.get_origin(tp) is tuple:  # tuple[int, ...] / tuple[str, ...]: a YAML list or 'a,b'
        if isinstance(value, str):
            value = [v for v in value.strip().strip("[]()").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or not value:
            raise ValueError
        return tuple(_cast(v.strip() if isinstance(v, str) else v, typing.get_args(tp)[0]) for v in value)
    raise TypeError(f"unsupported field type {tp}")


def type_name(tp) -> str:
    return f"list of {typing.get_args(tp)[0].__name__}" if typing.get_origin(tp) is tuple else tp.__name__


def coerce(f: dataclasses.Field, value: Any, where: str) -> Any:
    """Type-convert and check one value of field `f`; `where` ('file: key') starts the error line."""
    tp, nullable = base_type(f.type)
    if value is None or (nullable and isinstance(value, str) and value.lower() in _NONE_WORDS):
        if nullable:
            return None
        raise ConfigError(f"{where}: a value is required ({type_name(tp)})")
    try:
        value = _cast(value, tp)
    except (ValueError, TypeError):
        raise ConfigError(f"{where}: {value!r} is not a valid {type_name(tp)}{' or null' if nullable else ''}") from None
    meta = f.metadata
    many = isinstance(value, tuple)
    for v in value if many else (value,):
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{where}: {v!r} is not a finite number")
        if meta.get("choices") and v not in meta["choices"]:
            raise ConfigError(f"{where}: {v!r} is not one of {', '.join(meta['choices'])}")
        _check_range(v, meta, where, "every value " if many else "")
    return value


def _check_range(value: Any, meta: dict, where: str, which: str) -> None:
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and (value < lo or (meta.get("min_exclusive") and value == lo)):
        op = ">" if meta.get("min_exclusive") else ">="
        raise ConfigError(f"{where}: {value!r} is out of range ({which}must be {op} {lo})")
    if hi is not None and (value > hi or (meta.get("max_exclusive") and value == hi)):
        op = "<" if meta.get("max_exclusive") else "<="
        raise ConfigError(f"{where}: {value!r} is out of range ({which}must be {op} {hi})")


# -- sections ----------------------------------------------------------------------------------
def require_mapping(value: Any, where: str) -> dict:
    """None -> {}; a mapping as is; anything else a ConfigError naming `where`."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def check_keys(d: dict, allowed, where: str) -> None:
    for key in d:
        if key not in allowed:
            raise ConfigError(f"{where}.{key}: unknown key (allowed: {', '.join(allowed)})")


def user_fields(cls_or_obj) -> list[dataclasses.Field]:
    """The fields a user can set: those declared with `spec` (others are derived state)."""
    return [f for f in dataclasses.fields(cls_or_obj) if "doc" in f.metadata]


def parse_section(cls: type, raw: Any, where: str):
    """An instance of the field dataclass `cls` from a mapping: unknown keys and bad values
    are ConfigErrors naming `where.key`; keys left out take their defaults."""
    raw = require_mapping(raw, where)
    fields = {f.name: f for f in user_fields(cls)}
    check_keys(raw, tuple(fields), where)
    return cls(**{k: coerce(fields[k], v, f"{where}.{k}") for k, v in raw.items()})


def section_dict(obj) -> dict[str, Any]:
    """A field dataclass's user fields as plain YAML-ready values (tuples as lists): what
    parse_section reads back."""
    values = {f.name: getattr(obj, f.name) for f in user_fields(obj)}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def describe_fields(cls: type, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(key, default, doc) of every user field of `cls`: tables for the README and `vqstudy list`."""
    return [(prefix + f.name, f.default, f.metadata["doc"]) for f in user_fields(cls)]


# -- text in -------------------------------------------------------------------------------------
def flatten(d: dict[str, Any], source: str = "config", prefix: str = "") -> dict[str, Any]:
    """Nested and/or dotted dict -> flat dotted dict. Sections must be mappings."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: {prefix or 'top level'}: expected a mapping, got {type(d).__name__}")
    flat: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            flat.update(flatten(v, source, key))
        else:
            flat[key] = v
    return flat


def parse_assignments(assignments: list[str], source: str = "--set") -> dict[str, Any]:
    """['a.b=1', ...] -> {'a.b': '1'}: values stay strings; `coerce` types them per key."""
    flat = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{source}: '{item}': expected key=value, e.g. quantizer.codebook_size=1024")
        flat[key.strip()] = value.strip()
    return flat


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last
    silently: a study whose `grid` is written twice would sweep only the second)."""

    def construct_mapping(self, node, deep=False):
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Safe-load a YAML mapping; a missing or unreadable file, a syntax error or a key given
    twice becomes a one-line ConfigError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (expected YAML)") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        kind = "YAML error" if isinstance(e, yaml.constructor.ConstructorError) else "YAML syntax error"
        raise ConfigError(f"{path}: {kind}{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data
