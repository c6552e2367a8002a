"""The registries: name -> object, each object imported on first use.

Names are known without importing anything heavy, so config validation, `--dry-run` and
bad-input errors answer without importing torch (about 2 s on a small machine). Adding a
method or a dataset is one line here plus its implementation.
"""
from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Any


class Registry(Mapping):
    """A read-only mapping from names to 'module:attribute' paths, resolved lazily."""

    def __init__(self, entries: dict[str, str]):
        self._paths = dict(entries)
        self._loaded: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        if name not in self._loaded:
            module, attribute = self._paths[name].split(":")
            self._loaded[name] = getattr(importlib.import_module(module), attribute)
        return self._loaded[name]

    def __contains__(self, name: object) -> bool:
        return name in self._paths

    def __iter__(self) -> Iterator[str]:
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)


QUANTIZERS = Registry({
    "vq": "vqstudy.quantizers.vq:VQ",
    "ema": "vqstudy.quantizers.ema:EMAVQ",
    "simvq": "vqstudy.quantizers.simvq:SimVQ",
    "cvq": "vqstudy.quantizers.cvq:CVQ",
    "ibq": "vqstudy.quantizers.ibq:IBQ",
    "fsq": "vqstudy.quantizers.fsq:FSQ",
    "lfq": "vqstudy.quantizers.lfq:LFQ",
})

DATASETS = Registry({
    "gaussian_mixture": "vqstudy.data:gaussian_mixture",
    "shapes": "vqstudy.data:shapes",
    "digits": "vqstudy.data:digits",
    "mnist": "vqstudy.data:mnist",
    "fashion_mnist": "vqstudy.data:fashion_mnist",
    "cifar10": "vqstudy.data:cifar10",
    "imagefolder": "vqstudy.data:imagefolder",
})
