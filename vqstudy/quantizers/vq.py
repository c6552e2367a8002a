"""`vq`: the VQ-VAE quantizer ("Neural Discrete Representation Learning", van den Oord
et al. 2017). A learnable codebook trained by the codebook loss, the encoder held near
its codes by beta x the commitment loss, gradients passed straight through.

This is the baseline whose code usage collapses as K grows (SimVQ, Fig. 1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import QuantOut, kmeans, lookup, quant_out, vq_losses


class VQ(nn.Module):
    def __init__(self, dim: int, codebook_size: int, *, beta: float = 0.25, codebook_weight: float = 1.0,
                 rotation_trick: bool = False):
        super().__init__()
        self.beta, self.codebook_weight = beta, codebook_weight
        self.num_codes = codebook_size
        self.rotation_trick = rotation_trick
        # uniform(-1/K, 1/K), the init of the original VQ-VAE code
        weight = torch.empty(codebook_size, dim).uniform_(-1 / codebook_size, 1 / codebook_size)
        self.embedding = nn.Parameter(weight)          # (K, D)

    @property
    def codebook(self) -> Tensor:
        return self.embedding

    def forward(self, z: Tensor) -> QuantOut:
        _, idx, q = lookup(z, self.embedding)          # idx (N,), q like z
        return quant_out(z, q, idx, vq_losses(z, q, self.beta, self.codebook_weight), self.rotation_trick)

    def decode(self, indices: Tensor) -> Tensor:
        return F.embedding(indices, self.embedding)

    @torch.no_grad()
    def init_from_data(self, z: Tensor, iters: int = 10) -> None:
        """k-means-initialize the codebook on encoder outputs z, (N, D)."""
        self.embedding.copy_(kmeans(z, self.embedding.shape[0], iters))
