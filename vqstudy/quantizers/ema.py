"""`ema`: VQ-VAE with codes updated as exponential moving averages of their assigned
encoder outputs (van den Oord et al. 2017, appendix; Razavi et al. 2019, VQ-VAE-2),
with optional restart of dead codes from batch vectors (as in Dhariwal et al. 2020,
Jukebox). The codebook is a buffer: no codebook loss, only beta x commitment.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import QuantOut, ema_inplace, kmeans, lookup, quant_out, sample_rows, vq_losses


class EMAVQ(nn.Module):
    def __init__(self, dim: int, codebook_size: int, *, beta: float = 0.25, decay: float = 0.99,
                 dead_code_threshold: float = 0.0, rotation_trick: bool = False, eps: float = 1e-5):
        super().__init__()
        self.beta, self.decay, self.eps = beta, decay, eps
        self.num_codes = codebook_size
        self.dead_code_threshold = dead_code_threshold
        self.rotation_trick = rotation_trick
        embedding = torch.randn(codebook_size, dim)
        self.register_buffer("embedding", embedding)                   # (K, D)
        # Moving averages start as if each code had been used once, so that a code
        # never assigned keeps its value instead of being divided by ~0.
        self.register_buffer("cluster_size", torch.ones(codebook_size))  # (K,)
        self.register_buffer("embed_sum", embedding.clone())            # (K, D)

    @property
    def codebook(self) -> Tensor:
        return self.embedding

    def forward(self, z: Tensor) -> QuantOut:
        flat, idx, q = lookup(z, self.embedding)       # flat (N, D), idx (N,), q like z (old codes)
        if self.training:
            self._update(flat.detach().float(), idx)
        return quant_out(z, q, idx, vq_losses(z, q, self.beta, codebook_weight=None), self.rotation_trick)

    @torch.no_grad()
    def _update(self, flat: Tensor, idx: Tensor) -> None:
        k = self.embedding.shape[0]
        counts = torch.bincount(idx, minlength=k).float()                    # (K,)
        sums = torch.zeros_like(self.embed_sum).index_add_(0, idx, flat)     # (K, D)
        ema_inplace(self.cluster_size, counts, self.decay)
        ema_inplace(self.embed_sum, sums, self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + k * self.eps) * n   # Laplace smoothing
        self.embedding.copy_(self.embed_sum / smoothed[:, None])
        if self.dead_code_threshold > 0:
            self._restart_dead(flat)

    @torch.no_grad()
    def _restart_dead(self, flat: Tensor) -> None:
        """Codes whose EMA usage fell below the threshold jump to random batch vectors."""
        dead = (self.cluster_size < self.dead_code_threshold)[:, None]     # (K, 1)
        if flat.device.type == "cpu" and not dead.any():                    # free to ask on the CPU
            return
        fresh = sample_rows(flat, self.embedding.shape[0])                  # (K, D): one candidate per code
        # Written with where, not by counting the dead codes: a count would wait for the device every step.
        self.embedding.copy_(torch.where(dead, fresh, self.embedding))
        self.cluster_size.copy_(torch.where(dead[:, 0], self.dead_code_threshold, self.cluster_size))
        self.embed_sum.copy_(torch.where(dead, fresh * self.dead_code_threshold, self.embed_sum))

    def decode(self, indices: Tensor) -> Tensor:
        return F.embedding(indices, self.embedding)

    @torch.no_grad()
    def init_from_data(self, z: Tensor, iters: int = 10) -> None:
        """k-means-initialize the codebook (and its moving averages) on encoder outputs z, (N, D)."""
        centroids = kmeans(z, self.embedding.shape[0], iters)
        self.embedding.copy_(centroids)
        self.embed_sum.copy_(centroids)
        self.cluster_size.fill_(1.0)
