"""`simvq`: "Addressing Representation Collapse in Vector Quantized Models with One Linear
Layer" (Zhu et al. 2024, arXiv 2411.02038).

A frozen random codebook C ~ N(0, 1/D) is re-parameterized by one learnable linear layer
W: the codes are C W, recomputed every step. Every gradient step on W moves *all* codes
(the whole space they span), not only the ones selected, so codes do not die as K grows.
Losses as in the paper: ||sg(z) - q||^2 (trains only W: C is frozen) + beta ||z - sg(q)||^2.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import QuantOut, nearest_code, quant_out, vq_losses


class SimVQ(nn.Module):
    def __init__(self, dim: int, codebook_size: int, *, beta: float = 0.25, codebook_weight: float = 1.0,
                 rotation_trick: bool = False):
        super().__init__()
        self.beta, self.codebook_weight = beta, codebook_weight
        self.num_codes = codebook_size
        self.rotation_trick = rotation_trick
        self.register_buffer("frozen_codebook", torch.randn(codebook_size, dim) * dim**-0.5)  # C (K, D)
        self.proj = nn.Linear(dim, dim, bias=False)                                          # W

    @property
    def codebook(self) -> Tensor:
        return self.proj(self.frozen_codebook)          # C W, (K, D)

    def forward(self, z: Tensor) -> QuantOut:
        flat = z.reshape(-1, z.shape[-1])               # (N, D)
        with torch.no_grad():                            # the search needs all K codes, not their gradient
            idx = nearest_code(flat, self.codebook)     # (N,)
        q = self.decode(idx).view_as(z)                 # C[idx] W: gradient reaches W through N rows, not K
        return quant_out(z, q, idx, vq_losses(z, q, self.beta, self.codebook_weight), self.rotation_trick)

    def decode(self, indices: Tensor) -> Tensor:
        return self.proj(F.embedding(indices, self.frozen_codebook))
