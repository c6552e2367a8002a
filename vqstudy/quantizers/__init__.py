"""The quantizer factory over the registry (vqstudy/registry.py): one contract (`QuantOut`).

Every entry is a module built as `cls(dim, codebook_size, **options)` whose
`forward(z)` takes channel-last z (..., D) and returns `QuantOut(z_q, indices, losses)`,
whose `decode(indices)` gives back z_q, whose `num_codes` is the size of its codebook
(FSQ: the product of its levels) and whose `codebook` property returns the materialized
codes (K, D). Implicit codebooks (FSQ, LFQ) also give `implicit_covariance()`, so that
metrics never list their codes. Entries whose registry metadata says `kmeans` have
`init_from_data(z, iters)` (a test holds the two together).
"""
from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from ..errors import ConfigError
from ..registry import QUANTIZERS
from ._common import QuantOut, nearest_code

__all__ = ["QUANTIZERS", "QuantOut", "build_quantizer", "options_of", "nearest_code"]


def _lookup(name: str) -> type[nn.Module]:
    if name not in QUANTIZERS:
        raise ConfigError(f"quantizer.name: {name!r} is not one of {', '.join(QUANTIZERS)}")
    return QUANTIZERS[name]


def options_of(name: str) -> dict[str, Any]:
    """Option name -> default, for the quantizer `name` (its keyword-only arguments)."""
    params = inspect.signature(_lookup(name).__init__).parameters.values()
    return {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}


def build_quantizer(name: str, *, dim: int, codebook_size: int, **options: Any) -> nn.Module:
    """Build any registered quantizer; unknown names and options raise ConfigError."""
    allowed = options_of(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(f"quantizer {name}: unknown option {unknown[0]!r} "
                          f"(allowed: {', '.join(allowed) or 'none'})")
    return _lookup(name)(dim, codebook_size, **options)
