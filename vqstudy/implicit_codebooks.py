"""Sizes of the implicit codebooks (FSQ, LFQ): which codes a `quantizer.codebook_size` means.

Kept free of torch so that config validation (and a study's `--dry-run`) can refuse an
impossible size in a tenth of a second, before any trial starts.
"""
from __future__ import annotations

import math

from .errors import ConfigError

# "Finite Scalar Quantization" (Mentzer et al. 2023), Table 1: levels recommended for a
# target codebook size. The products are close to, not equal to, the targets (2^10 -> 1000
# codes). 2^18 -> 8^6 is vqstudy's extension (exactly 2^18 codes, every L_i >= 5 as the
# paper advises) so that FSQ can run the SimVQ paper's K range; the paper stops at 2^16.
FSQ_LEVELS: dict[int, tuple[int, ...]] = {
    2**8: (8, 6, 5),
    2**10: (8, 5, 5, 5),
    2**12: (7, 5, 5, 5, 5),
    2**14: (8, 8, 8, 6, 5),
    2**16: (8, 8, 8, 5, 5, 5),
    2**18: (8, 8, 8, 8, 8, 8),
}


def fsq_levels(codebook_size: int, levels: tuple[int, ...] | None, source: str = "config") -> tuple[int, ...]:
    """The levels FSQ uses: `levels` when given (their product must be `codebook_size`, so
    that the recorded K is the real one), else the paper's levels for `codebook_size`."""
    if levels is not None:
        levels = tuple(levels)
        if math.prod(levels) != codebook_size:
            raise ConfigError(f"{source}: quantizer.levels: {list(levels)} give {math.prod(levels):,} codes, "
                              f"but quantizer.codebook_size is {codebook_size:,} (set it to {math.prod(levels)})")
        return levels
    if codebook_size not in FSQ_LEVELS:
        known = ", ".join(str(k) for k in FSQ_LEVELS)
        raise ConfigError(f"{source}: quantizer.codebook_size: fsq knows levels for {known}, not {codebook_size} "
                          f"(or set quantizer.levels, e.g. [8, 5, 5, 5] with codebook_size 1000)")
    return FSQ_LEVELS[codebook_size]


def lfq_bits(codebook_size: int, source: str = "config") -> int:
    """LFQ quantizes each of log2(K) dimensions to a sign, so K must be a power of two."""
    bits = codebook_size.bit_length() - 1
    if codebook_size != 2**bits:
        raise ConfigError(f"{source}: quantizer.codebook_size: lfq needs a power of two (2^bits codes), "
                          f"not {codebook_size} (nearest: {2**bits} or {2**(bits + 1)})")
    return bits


def fsq_size_rule(q, source: str = "config") -> None:
    """The registry's size rule for fsq: `q` (a QuantizerConfig) names a possible codebook."""
    fsq_levels(q.codebook_size, q.levels, source)


def lfq_size_rule(q, source: str = "config") -> None:
    """The registry's size rule for lfq: a power of two."""
    lfq_bits(q.codebook_size, source)
