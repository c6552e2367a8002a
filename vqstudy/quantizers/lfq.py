"""`lfq`: lookup-free quantization, from MAGVIT-v2 ("Language Model Beats Diffusion --
Tokenizer is Key to Visual Generation", Yu et al. 2023, arXiv 2310.05737).

The codebook is the corners {-1, +1}^d of a d = log2(K) dimensional cube: a vector's code
is the sign of each of its d channels, its index the bits read most significant first
(as vector-quantize-pytorch's LFQ; tests check the same input gives the same codes). No
search and no codebook to learn, so K = 2^18 costs what K = 2^4 does. z is projected
D -> d and back when D != d. Losses: beta x commitment, and the paper's entropy penalty --
per-sample entropy down, batch entropy up -- with separate weights, in training only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..implicit_codebooks import lfq_bits
from ._common import QuantOut, entropy_losses, estimate_gradient, projected_covariance, projection


class LFQ(nn.Module):
    def __init__(self, dim: int, codebook_size: int, *, beta: float = 0.25, sample_entropy_weight: float = 0.1,
                 batch_entropy_weight: float = 0.1, entropy_temperature: float = 0.01):
        super().__init__()
        bits = lfq_bits(codebook_size)
        self.num_codes = 2**bits
        self.beta = beta
        self.sample_entropy_weight, self.batch_entropy_weight = sample_entropy_weight, batch_entropy_weight
        self.entropy_temperature = entropy_temperature
        self.register_buffer("bit_values", 2 ** torch.arange(bits - 1, -1, -1), persistent=False)  # (d,) MSB first
        self.project_in, self.project_out = projection(dim, bits)

    def forward(self, z: Tensor) -> QuantOut:
        h = self.project_in(z).float()                                     # (..., d)
        positive = h > 0
        q = torch.where(positive, 1.0, -1.0)                               # the nearest cube corner
        idx = (positive.long() * self.bit_values).sum(-1)                  # (...,)
        losses = {"commitment": self.beta * F.mse_loss(h, q)}
        if self.training:
            # code c scores 2 h.c = sum_i 2 h_i c_i: independent +-2 h_i logits per channel
            flat = h.reshape(-1, h.shape[-1])
            losses.update(entropy_losses(torch.stack((2 * flat, -2 * flat), -1), self.entropy_temperature,
                                         self.sample_entropy_weight, self.batch_entropy_weight))
        z_q = self.project_out(estimate_gradient(h, q, use_rotation=False))
        return QuantOut(z_q.to(z.dtype), idx, losses)

    def codes_of(self, indices: Tensor) -> Tensor:
        """Cube corners (..., d) of code indices (...,)."""
        return torch.where((indices[..., None] & self.bit_values) != 0, 1.0, -1.0)

    def decode(self, indices: Tensor) -> Tensor:
        return self.project_out(self.codes_of(indices))

    @property
    def codebook(self) -> Tensor:
        """All 2^d codes, materialized (K, D): for small K and tests; metrics use
        `implicit_covariance` instead."""
        return self.decode(torch.arange(self.num_codes, device=self.bit_values.device))

    def implicit_covariance(self) -> Tensor:
        """(D, D) covariance of the 2^d corners without listing them: identity in the cube."""
        d = self.bit_values.numel()
        return projected_covariance(torch.eye(d, dtype=torch.float64, device=self.bit_values.device), self.project_out)
