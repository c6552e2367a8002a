"""`fsq`: "Finite Scalar Quantization: VQ-VAE Made Simple" (Mentzer et al. 2023, arXiv 2309.15505).

No codebook to learn and no auxiliary loss: z is projected to d = len(levels) channels,
channel i is squashed by a tanh onto L_i integer values and rounded (straight-through).
The implicit codebook is the product grid of prod(L_i) codes, every one reachable by
construction, which is why FSQ does not collapse. `quantizer.codebook_size` picks the
paper's levels (vqstudy/implicit_codebooks.py) unless `quantizer.levels` is given.

Bound, code values and index order follow vector-quantize-pytorch's FSQ (tests check that
the same input gives the same codes): index = sum_i level_i * prod_{j<i} L_j.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..implicit_codebooks import fsq_levels
from ._common import QuantOut, estimate_gradient, projected_covariance, projection


class FSQ(nn.Module):
    def __init__(self, dim: int, codebook_size: int, *, levels: tuple[int, ...] | None = None):
        super().__init__()
        levels = fsq_levels(codebook_size, levels)
        self.num_codes = math.prod(levels)
        self.register_buffer("levels", torch.tensor(levels), persistent=False)                 # (d,) L_i
        self.register_buffer("half_width", self.levels // 2, persistent=False)                 # (d,)
        basis = torch.cumprod(torch.tensor((1,) + levels[:-1]), 0)
        self.register_buffer("basis", basis, persistent=False)                                 # (d,)
        self.project_in, self.project_out = projection(dim, len(levels))

    def bound(self, h: Tensor, eps: float = 1e-3) -> Tensor:
        """tanh onto (-L_i/2, L_i/2), shifted by 1/2 for even L_i, so that rounding gives
        exactly L_i integers per channel and h = 0 lands on a level."""
        half_l = (self.levels - 1) * (1 + eps) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0)
        shift = (offset / half_l).atanh()
        return (h + shift).tanh() * half_l - offset

    def forward(self, z: Tensor) -> QuantOut:
        bounded = self.bound(self.project_in(z).float())                     # (..., d)
        rounded = bounded.round()                                              # integers in [-L_i/2, L_i/2)
        codes = estimate_gradient(bounded, rounded, use_rotation=False) / self.half_width  # in [-1, 1]
        idx = ((rounded + self.half_width) * self.basis).sum(-1).long()        # (...,)
        return QuantOut(self.project_out(codes).to(z.dtype), idx, {})

    def codes_of(self, indices: Tensor) -> Tensor:
        """Grid codes (..., d) in [-1, 1] of code indices (...,)."""
        level = (indices[..., None] // self.basis) % self.levels             # (..., d)
        return (level - self.half_width) / self.half_width

    def decode(self, indices: Tensor) -> Tensor:
        return self.project_out(self.codes_of(indices))

    @property
    def codebook(self) -> Tensor:
        """All prod(L_i) codes, materialized (K, D): for small K and tests; metrics use
        `implicit_covariance` instead."""
        return self.decode(torch.arange(self.num_codes, device=self.levels.device))

    def implicit_covariance(self) -> Tensor:
        """(D, D) covariance of the K codes without listing them: the grid is a product of
        independent uniform channels, so its covariance is diagonal."""
        var = []
        for n_levels, half in zip(self.levels.tolist(), self.half_width.tolist()):
            values = (torch.arange(n_levels, dtype=torch.float64) - half) / half
            var.append(values.var(unbiased=False))
        return projected_covariance(torch.diag(torch.stack(var)).to(self.levels.device), self.project_out)
