"""Trial configuration: four small dataclasses inside `TrialConfig`, addressed by dotted keys.

One key names one thing everywhere: `quantizer.codebook_size` is the YAML key, the
`--set` override, the Ray search-space entry, the MLflow param and the results column.
Every way in (nested dict, flat dict, YAML file, `--set k=v`) goes through `coerce()`,
so a bad value gets the same one-line `ConfigError` naming the key and what is allowed.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """Bad configuration: the message names the key and what is allowed, in one line."""


def _f(default, *, doc: str, min=None, max=None, choices=None, min_exclusive=False, max_exclusive=False):
    """A dataclass field with its documentation and range, read by `coerce` and `describe`."""
    meta = {"doc": doc, "min": min, "max": max, "choices": choices, "min_exclusive": min_exclusive,
            "max_exclusive": max_exclusive}
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    name: str = _f("gaussian_mixture", doc="dataset (see `vqstudy list`)")
    root: str = _f("data", doc="folder holding torchvision datasets / image folders")
    download: bool = _f(False, doc="let torchvision download mnist/fashion_mnist/cifar10")
    seed: int = _f(0, doc="seed of synthetic data and of the train/eval split", min=0)
    num_train: int | None = _f(None, doc="train examples; null = dataset default (all for file datasets)", min=1)
    num_eval: int | None = _f(None, doc="eval examples; null = dataset default (all for file datasets)", min=1)
    dim: int = _f(16, doc="gaussian_mixture: ambient dimension n", min=1)
    num_components: int = _f(64, doc="gaussian_mixture: number of Gaussians C", min=1)
    spread: float = _f(0.1, doc="gaussian_mixture: std of each Gaussian (centres have std 1)", min=0.0)
    image_size: int = _f(32, doc="shapes / imagefolder: side of the square images", min=4)


@dataclass
class ModelConfig:
    latent_dim: int = _f(16, doc="D, the dimension of encoder outputs and codes", min=1)
    encoder_width: int = _f(64, doc="encoder channels (images) or hidden units (vectors)", min=1)
    encoder_depth: int = _f(2, doc="residual blocks (images) or hidden layers (vectors) in the encoder", min=0)
    decoder_width: int = _f(64, doc="decoder channels / hidden units, fixed while the encoder is swept", min=1)
    decoder_depth: int = _f(2, doc="decoder residual blocks / hidden layers", min=0)
    downsample: int = _f(2, doc="images: stride-2 stages; latent grid is image_size / 2^downsample", min=0, max=6)


@dataclass
class QuantizerConfig:
    name: str = _f("vq", doc="quantizer (see `vqstudy list`)")
    codebook_size: int = _f(512, doc="K, the number of codes", min=2)
    beta: float = _f(0.25, doc="weight of the commitment loss", min=0.0)
    codebook_weight: float = _f(1.0, doc="vq/simvq/cvq/ibq: weight of the codebook loss", min=0.0)
    init: str = _f("random", doc="codebook init of the learnable codebooks (vq, ema, cvq, ibq)",
                   choices=("random", "kmeans"))
    warmup_steps: int = _f(0, doc="steps trained as a continuous autoencoder before quantizing", min=0)
    kmeans_iters: int = _f(10, doc="Lloyd iterations of the k-means init", min=1)
    rotation_trick: bool = _f(False, doc="rotation-trick gradient estimator instead of straight-through")
    decay: float = _f(0.99, doc="ema: decay of the codebook moving averages; cvq: of the code-usage average",
                      min=0.0, max=1.0, min_exclusive=True, max_exclusive=True)
    dead_code_threshold: float = _f(0.0, doc="ema: restart codes whose EMA usage falls below this (0 = off)", min=0.0)
    distance: str = _f("cos", doc="cvq: distance of the code search and anchors", choices=("cos", "l2"))
    anchor: str = _f("probrandom", doc="cvq: batch feature a rarely used code is pulled to",
                     choices=("probrandom", "closest", "random"))
    levels: tuple[int, ...] | None = _f(None, doc="fsq: levels per channel, e.g. [8, 5, 5, 5]; null = the FSQ "
                                        "paper's levels for codebook_size", min=3)
    sample_entropy_weight: float = _f(0.1, doc="lfq/ibq: weight of the per-sample entropy (minimized)", min=0.0)
    batch_entropy_weight: float = _f(0.1, doc="lfq/ibq: weight of the batch (codebook) entropy (maximized)", min=0.0)
    entropy_temperature: float = _f(0.01, doc="lfq/ibq: temperature of the soft assignment the entropies use",
                                    min=0.0, min_exclusive=True)
    batch_entropy: str = _f("joint", doc="lfq: batch entropy over all 2^d codes (joint) or summed over bits "
                            "(factorized: cheaper, blind to correlated bits)", choices=("joint", "factorized"))


@dataclass
class TrainConfig:
    steps: int = _f(1000, doc="optimizer steps", min=1)
    batch_size: int = _f(256, doc="examples per step", min=1)
    lr: float = _f(1e-3, doc="Adam learning rate", min=0.0, min_exclusive=True)
    eval_every: int = _f(250, doc="steps between evaluations (and checkpoints); the last step always evaluates", min=1)
    eval_batch_size: int = _f(1024, doc="examples per forward pass during evaluation", min=1)
    seed: int = _f(0, doc="seed of model init, batch order and codebook restarts", min=0)
    device: str = _f("auto", doc="auto (cuda when available), cpu, cuda, cuda:N or mps")


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "quantizer": QuantizerConfig,
    "train": TrainConfig,
}


@dataclass
class TrialConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    # -- construction -------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, source: str = "config") -> "TrialConfig":
        """Build from a nested dict, a flat dict of dotted keys, or a mix of both, then validate."""
        return cls().updated(flatten(d or {}, source), source)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrialConfig":
        return cls.from_dict(load_yaml(path), source=str(path))

    def updated(self, flat: dict[str, Any], source: str = "config") -> "TrialConfig":
        """A copy with dotted keys replaced (values coerced and checked), validated as a whole."""
        sections = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        for key, value in flat.items():
            section, name = split_key(key, source)
            sections[section][name] = coerce(key, value, source)
        cfg = TrialConfig(**{s: SECTIONS[s](**v) for s, v in sections.items()})
        validate(cfg, source)
        return cfg

    def with_overrides(self, assignments: list[str], source: str = "--set") -> "TrialConfig":
        """Apply `key=value` strings, as given on the command line."""
        return self.updated(parse_assignments(assignments, source), source)

    # -- views --------------------------------------------------------------------
    def to_flat(self) -> dict[str, Any]:
        """Dotted key -> value: the MLflow params and the results-table columns."""
        return {f"{s}.{k}": v for s in SECTIONS for k, v in dataclasses.asdict(getattr(self, s)).items()}

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {s: dataclasses.asdict(getattr(self, s)) for s in SECTIONS}


# -- keys and values ----------------------------------------------------------------
def all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, c in SECTIONS.items() for f in dataclasses.fields(c)]


@functools.lru_cache(maxsize=None)
def field_of(key: str) -> dataclasses.Field:
    section, name = key.split(".", 1)
    return {f.name: f for f in dataclasses.fields(SECTIONS[section])}[name]


def split_key(key: str, source: str = "config") -> tuple[str, str]:
    """'quantizer.codebook_size' -> ('quantizer', 'codebook_size'), or ConfigError with a suggestion."""
    if key in SECTIONS:
        raise ConfigError(f"{source}: {key}: expected a mapping of {key}.* keys, not a single value")
    if key not in all_keys():
        hint = difflib.get_close_matches(key, all_keys(), n=1)
        tip = f" (did you mean {hint[0]}?)" if hint else f"; sections are {', '.join(SECTIONS)}"
        raise ConfigError(f"{source}: {key}: unknown key{tip}")
    section, name = key.split(".", 1)
    return section, name


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


_NONE_WORDS = {"none", "null", "~", ""}
_BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True,
               "false": False, "no": False, "off": False, "0": False}


@functools.lru_cache(maxsize=None)
def _base_type(annotation) -> tuple[type, bool]:
    """(the non-None type, whether None is allowed) of a field annotation such as 'int | None'."""
    tp = eval(annotation, {"int": int, "float": float, "str": str, "bool": bool}) \
        if isinstance(annotation, str) else annotation  # annotations are postponed strings
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return tp, False


def key_type(key: str) -> type:
    """The Python type of a dotted key's values (int, float, bool or str)."""
    return _base_type(field_of(key).type)[0]


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
    if typing.get_origin(tp) is tuple:  # tuple[int, ...]
        if isinstance(value, str):
            value = [v for v in value.strip().strip("[]()").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or not value:
            raise ValueError
        return tuple(_cast(v.strip() if isinstance(v, str) else v, typing.get_args(tp)[0]) for v in value)
    raise TypeError(f"unsupported field type {tp}")


def _type_name(tp) -> str:
    return f"list of {typing.get_args(tp)[0].__name__}" if typing.get_origin(tp) is tuple else tp.__name__


def coerce(key: str, value: Any, source: str = "config") -> Any:
    """Type-convert and range-check one value for dotted `key`; ConfigError says what is allowed."""
    f = field_of(key)
    tp, nullable = _base_type(f.type)
    if value is None or (nullable and isinstance(value, str) and value.lower() in _NONE_WORDS):
        if nullable:
            return None
        raise ConfigError(f"{source}: {key}: a value is required ({_type_name(tp)})")
    try:
        value = _cast(value, tp)
    except (ValueError, TypeError):
        raise ConfigError(f"{source}: {key}: {value!r} is not a valid {_type_name(tp)}"
                          f"{' or null' if nullable else ''}") from None
    meta = f.metadata
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{source}: {key}: {value!r} is not one of {', '.join(meta['choices'])}")
    for v in value if isinstance(value, tuple) else (value,):
        _check_range(key, v, meta, source, "every value " if isinstance(value, tuple) else "")
    return value


def _check_range(key: str, value: Any, meta: dict, source: str, which: str) -> None:
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and (value < lo or (meta.get("min_exclusive") and value == lo)):
        op = ">" if meta.get("min_exclusive") else ">="
        raise ConfigError(f"{source}: {key}: {value!r} is out of range ({which}must be {op} {lo})")
    if hi is not None and (value > hi or (meta.get("max_exclusive") and value == hi)):
        op = "<" if meta.get("max_exclusive") else "<="
        raise ConfigError(f"{source}: {key}: {value!r} is out of range ({which}must be {op} {hi})")


def validate(cfg: TrialConfig, source: str = "config") -> None:
    """Rules that span fields or need a registry: names known, combinations possible."""
    from .implicit_codebooks import fsq_levels, lfq_bits
    from .registry import DATASETS, QUANTIZERS

    q = cfg.quantizer
    if cfg.data.name not in DATASETS:
        raise ConfigError(f"{source}: data.name: {cfg.data.name!r} is not one of {', '.join(DATASETS)}")
    if q.name not in QUANTIZERS:
        raise ConfigError(f"{source}: quantizer.name: {q.name!r} is not one of {', '.join(QUANTIZERS)}")
    if q.init == "kmeans" and not _supports_kmeans(q.name):
        allowed = ", ".join(n for n in QUANTIZERS if _supports_kmeans(n))
        raise ConfigError(f"{source}: quantizer.init: kmeans needs a learnable codebook ({allowed}), not {q.name}")
    if q.name == "fsq":
        fsq_levels(q.codebook_size, q.levels, source)
    if q.name == "lfq":
        lfq_bits(q.codebook_size, source)
    if q.warmup_steps >= cfg.train.steps:
        raise ConfigError(f"{source}: quantizer.warmup_steps: {q.warmup_steps} leaves no quantized steps "
                          f"(must be < train.steps = {cfg.train.steps})")
    device = cfg.train.device
    if not (device in ("auto", "cpu", "cuda", "mps") or (device.startswith("cuda:") and device[5:].isdigit())):
        raise ConfigError(f"{source}: train.device: {device!r} is not one of auto, cpu, cuda, cuda:N, mps")


def _supports_kmeans(name: str) -> bool:
    from .quantizers import supports_kmeans  # imports the method (and torch): only for kmeans configs

    return supports_kmeans(name)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Safe-load a YAML mapping; a missing file or a syntax error becomes a one-line ConfigError."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def describe() -> list[tuple[str, Any, str]]:
    """(dotted key, default, doc) for every field: the README's and `vqstudy list`'s config table."""
    rows = []
    for s, c in SECTIONS.items():
        for f in dataclasses.fields(c):
            rows.append((f"{s}.{f.name}", f.default, f.metadata.get("doc", "")))
    return rows
