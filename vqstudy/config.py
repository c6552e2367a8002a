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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import fields
from .errors import ConfigError
from .fields import flatten, load_yaml, parse_assignments, spec
from .registry import DATASETS, QUANTIZERS


@dataclass
class DataConfig:
    name: str = spec("gaussian_mixture", doc="dataset (see `vqstudy list`)")
    root: str = spec("data", doc="folder holding torchvision datasets / image folders (relative: to where the study started)")
    download: bool = spec(False, doc="let torchvision download mnist/fashion_mnist/cifar10")
    seed: int = spec(0, doc="seed of synthetic data and of the train/eval split", min=0)
    num_train: int | None = spec(None, doc="train examples; null = dataset default (all for file datasets)", min=1)
    num_eval: int | None = spec(None, doc="eval examples; null = dataset default (all for file datasets)", min=1)
    dim: int = spec(16, doc="gaussian_mixture: ambient dimension n", min=1)
    num_components: int = spec(64, doc="gaussian_mixture: number of Gaussians C", min=1)
    spread: float = spec(0.1, doc="gaussian_mixture: std of each Gaussian (centres have std 1)", min=0.0)
    image_size: int = spec(32, doc="shapes / imagefolder: side of the square images", min=4)


@dataclass
class ModelConfig:
    latent_dim: int = spec(16, doc="D, the dimension of encoder outputs and codes", min=1)
    encoder_width: int = spec(64, doc="encoder channels (images) or hidden units (vectors)", min=1)
    encoder_depth: int = spec(2, doc="residual blocks (images) or hidden layers (vectors) in the encoder", min=0)
    decoder_width: int = spec(64, doc="decoder channels / hidden units, fixed while the encoder is swept", min=1)
    decoder_depth: int = spec(2, doc="decoder residual blocks / hidden layers", min=0)
    downsample: int = spec(2, doc="images: stride-2 stages; latent grid is image_size / 2^downsample", min=0, max=6)


@dataclass
class QuantizerConfig:
    name: str = spec("vq", doc="quantizer (see `vqstudy list`)")
    codebook_size: int = spec(512, doc="K, the number of codes", min=2)
    beta: float = spec(0.25, doc="weight of the commitment loss", min=0.0)
    codebook_weight: float = spec(1.0, doc="vq/simvq/cvq/ibq: weight of the codebook loss", min=0.0)
    init: str = spec("random", doc="codebook init of the learnable codebooks (vq, ema, cvq, ibq)",
                   choices=("random", "kmeans"))
    warmup_steps: int = spec(0, doc="steps trained as a continuous autoencoder before quantizing", min=0)
    kmeans_iters: int = spec(10, doc="Lloyd iterations of the k-means init", min=1)
    rotation_trick: bool = spec(False, doc="rotation-trick gradient estimator instead of straight-through")
    decay: float = spec(0.99, doc="ema: decay of the codebook moving averages; cvq: of the code-usage average",
                      min=0.0, max=1.0, min_exclusive=True, max_exclusive=True)
    dead_code_threshold: float = spec(0.0, doc="ema: restart codes whose EMA usage falls below this (0 = off)", min=0.0)
    distance: str = spec("cos", doc="cvq: distance of the code search and anchors", choices=("cos", "l2"))
    anchor: str = spec("probrandom", doc="cvq: batch feature a rarely used code is pulled to",
                     choices=("probrandom", "closest", "random"))
    levels: tuple[int, ...] | None = spec(None, doc="fsq: levels per channel, e.g. [8, 5, 5, 5]; null = the FSQ "
                                        "paper's levels for codebook_size", min=3)
    sample_entropy_weight: float = spec(0.1, doc="lfq/ibq: weight of the per-sample entropy (minimized)", min=0.0)
    batch_entropy_weight: float = spec(0.1, doc="lfq/ibq: weight of the batch (codebook) entropy (maximized)", min=0.0)
    entropy_temperature: float = spec(0.01, doc="lfq/ibq: temperature of the soft assignment the entropies use",
                                    min=0.0, min_exclusive=True)
    batch_entropy: str = spec("joint", doc="lfq: batch entropy over all 2^d codes (joint) or summed over bits "
                            "(factorized: cheaper, blind to correlated bits)", choices=("joint", "factorized"))


@dataclass
class TrainConfig:
    steps: int = spec(1000, doc="optimizer steps", min=1)
    batch_size: int = spec(256, doc="examples per step", min=1)
    lr: float = spec(1e-3, doc="Adam learning rate", min=0.0, min_exclusive=True)
    eval_every: int = spec(250, doc="steps between evaluations (and checkpoints); the last step always evaluates", min=1)
    eval_batch_size: int = spec(1024, doc="examples per forward pass during evaluation", min=1)
    seed: int = spec(0, doc="seed of model init, batch order and codebook restarts", min=0)
    device: str = spec("auto", doc="auto (cuda when the trial has a GPU, else cpu), cpu, cuda, cuda:N or mps")
    precision: str = spec("fp32", doc="fp32, or bf16 autocast of encoder and decoder (the quantizer stays fp32)",
                        choices=("fp32", "bf16"))
    compile: bool = spec(False, doc="torch.compile the encoder and decoder (each trial compiles first: ~5 s on 2 CPU cores)")


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


def key_type(key: str) -> type:
    """The Python type of a dotted key's values (int, float, bool, str or tuple[int, ...])."""
    return fields.base_type(field_of(key).type)[0]


def coerce(key: str, value: Any, source: str = "config") -> Any:
    """Type-convert and range-check one value for dotted `key`; ConfigError says what is allowed."""
    return fields.coerce(field_of(key), value, f"{source}: {key}")


def validate(cfg: TrialConfig, source: str = "config") -> None:
    """Rules that span fields or need a registry: names known, combinations possible. Asks
    the registry entries, never the implementations (no torch)."""
    q = cfg.quantizer
    if cfg.data.name not in DATASETS:
        raise ConfigError(f"{source}: data.name: {cfg.data.name!r} is not one of {', '.join(DATASETS)}")
    if q.name not in QUANTIZERS:
        raise ConfigError(f"{source}: quantizer.name: {q.name!r} is not one of {', '.join(QUANTIZERS)}")
    entry, modality = QUANTIZERS.entry(q.name), DATASETS.entry(cfg.data.name).modality
    if q.init == "kmeans" and not entry.kmeans:
        allowed = ", ".join(n for n in QUANTIZERS if QUANTIZERS.entry(n).kmeans)
        raise ConfigError(f"{source}: quantizer.init: kmeans needs a learnable codebook ({allowed}), not {q.name}")
    if modality not in entry.modalities:
        raise ConfigError(f"{source}: quantizer.name: {q.name} takes {', '.join(entry.modalities)} data, "
                          f"not {cfg.data.name} ({modality})")
    if entry.size_rule:
        entry.size_rule(q, source)
    if q.warmup_steps >= cfg.train.steps:
        raise ConfigError(f"{source}: quantizer.warmup_steps: {q.warmup_steps} leaves no quantized steps "
                          f"(must be < train.steps = {cfg.train.steps})")
    device = cfg.train.device
    if not (device in ("auto", "cpu", "cuda", "mps") or (device.startswith("cuda:") and device[5:].isdigit())):
        raise ConfigError(f"{source}: train.device: {device!r} is not one of auto, cpu, cuda, cuda:N, mps")


def describe() -> list[tuple[str, Any, str]]:
    """(dotted key, default, doc) for every field: the README's and `vqstudy list`'s config table."""
    return [row for s, c in SECTIONS.items() for row in fields.describe_fields(c, f"{s}.")]
