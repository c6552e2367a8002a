"""The registries: name -> entry, each entry carrying what validation needs to know about it
and the 'module:attribute' path of its implementation, imported on first use.

Validation, `--dry-run` and bad-input errors ask the entry (does k-means apply? which
codebook sizes are possible? which data can it take?) and never import the implementation,
so they answer without torch (about 2 s to import on a small machine). Adding a method or
a dataset is one entry here plus its implementation; tests check each entry against its
implementation.
"""
from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Callable

from .implicit_codebooks import fsq_size_rule, lfq_size_rule
from .modalities import MODALITIES


def load(path: str) -> Any:
    """'package.module:attribute' -> the object."""
    module, attribute = path.split(":")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class QuantizerEntry:
    path: str
    kmeans: bool = False                         # a learnable codebook that k-means can initialize
    size_rule: Callable | None = None            # (QuantizerConfig, source) -> None, or ConfigError
    modalities: tuple[str, ...] = tuple(MODALITIES)  # channel-last z of any shape: every modality
    dense_over_k: bool = False                   # a softmax over every code per vector (N x K with gradients);
                                                 # else the nearest-code search is chunked (_common.nearest_code)


@dataclass(frozen=True)
class DatasetEntry:
    path: str
    modality: str
    reads_root: bool = False     # reads files under data.root (checked before Ray on one machine)


class Registry(Mapping):
    """A read-only mapping from names to implementations, resolved lazily; `entry(name)`
    gives the metadata without importing anything."""

    def __init__(self, entries: dict[str, Any]):
        self._entries = dict(entries)
        self._loaded: dict[str, Any] = {}

    def entry(self, name: str) -> Any:
        return self._entries[name]

    def __getitem__(self, name: str) -> Any:
        if name not in self._loaded:
            self._loaded[name] = load(self._entries[name].path)
        return self._loaded[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


QUANTIZERS = Registry({
    "vq": QuantizerEntry("vqstudy.quantizers.vq:VQ", kmeans=True),
    "ema": QuantizerEntry("vqstudy.quantizers.ema:EMAVQ", kmeans=True),
    "simvq": QuantizerEntry("vqstudy.quantizers.simvq:SimVQ"),
    "cvq": QuantizerEntry("vqstudy.quantizers.cvq:CVQ", kmeans=True),
    "ibq": QuantizerEntry("vqstudy.quantizers.ibq:IBQ", kmeans=True, dense_over_k=True),
    "fsq": QuantizerEntry("vqstudy.quantizers.fsq:FSQ", size_rule=fsq_size_rule),
    "lfq": QuantizerEntry("vqstudy.quantizers.lfq:LFQ", size_rule=lfq_size_rule, dense_over_k=True),
})

DATASETS = Registry({
    "gaussian_mixture": DatasetEntry("vqstudy.data:gaussian_mixture", "vector"),
    "shapes": DatasetEntry("vqstudy.data:shapes", "image"),
    "digits": DatasetEntry("vqstudy.data:digits", "image"),
    "mnist": DatasetEntry("vqstudy.data:mnist", "image", reads_root=True),
    "fashion_mnist": DatasetEntry("vqstudy.data:fashion_mnist", "image", reads_root=True),
    "cifar10": DatasetEntry("vqstudy.data:cifar10", "image", reads_root=True),
    "imagefolder": DatasetEntry("vqstudy.data:imagefolder", "image", reads_root=True),
})
