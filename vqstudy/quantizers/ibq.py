"""`ibq`: "Scalable Image Tokenization with Index Backpropagation Quantization" (Shi et al.
2024, arXiv 2412.02692; reference code TencentARC/SEED-Voken).

Each vector scores every code by z.c_k; the code is the argmax, but z_q carries the
straight-through gradient of the softmax over all K scores (hard one-hot forward, soft
one-hot backward), so every code receives gradient at every step, not only the selected
ones: the codebook moves as a whole with the encoder and codes do not die as K grows.

Losses (training): `index_backprop` ||z_q - z||^2 through that soft path (weight 1), the
VQ pair `commitment` beta ||z - sg(q)||^2 and `codebook` codebook_weight ||q - sg(z)||^2,
and MAGVIT-v2's entropy penalty on softmax(z.C / entropy_temperature). The reference code
weights the VQ pair 1 (commitment) and 0.25 (codebook): `quantizer.beta: 1` with
`quantizer.codebook_weight: 0.25`; vqstudy's defaults keep beta the commitment weight of
every method. The training step holds the N x K scores (inherent to the method); the eval
search is chunked like every other.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import QuantOut, entropy_losses, kmeans, nearest_code, vq_losses


class IBQ(nn.Module):
    def __init__(self, dim: int, codebook_size: int, *, beta: float = 0.25, codebook_weight: float = 1.0,
                 sample_entropy_weight: float = 0.1, batch_entropy_weight: float = 0.1,
                 entropy_temperature: float = 0.01):
        super().__init__()
        self.beta, self.codebook_weight = beta, codebook_weight
        self.sample_entropy_weight, self.batch_entropy_weight = sample_entropy_weight, batch_entropy_weight
        self.entropy_temperature = entropy_temperature
        self.num_codes = codebook_size
        self.embedding = nn.Parameter(torch.randn(codebook_size, dim))   # (K, D), nn.Embedding's N(0, 1) as the reference

    @property
    def codebook(self) -> Tensor:
        return self.embedding

    def forward(self, z: Tensor) -> QuantOut:
        flat = z.reshape(-1, z.shape[-1])                                 # (N, D)
        if not (self.training and torch.is_grad_enabled()):
            idx = nearest_code(flat, self.embedding, inner_product=True)  # argmax_k z.c_k, in row blocks
            q = F.embedding(idx, self.embedding)
            return QuantOut(q.view_as(z), idx.view(z.shape[:-1]), vq_losses(z, q.view_as(z), self.beta,
                                                                            self.codebook_weight))
        logits = flat @ self.embedding.t()                                # (N, K): every code scores every vector
        idx = logits.argmax(1)                                            # (N,)
        q = F.embedding(idx, self.embedding)                              # (N, D) hard codes
        soft = logits.softmax(1) @ self.embedding.detach()                # (N, D) soft codes
        z_q = q + soft - soft.detach()                                    # value q; gradient via the softmax to all codes
        losses = {"index_backprop": F.mse_loss(z_q, flat), **vq_losses(flat, q, self.beta, self.codebook_weight),
                  **entropy_losses(logits[:, None], self.entropy_temperature,
                                   self.sample_entropy_weight, self.batch_entropy_weight)}
        return QuantOut(z_q.view_as(z), idx.view(z.shape[:-1]), losses)

    def decode(self, indices: Tensor) -> Tensor:
        return F.embedding(indices, self.embedding)

    @torch.no_grad()
    def init_from_data(self, z: Tensor, iters: int = 10) -> None:
        """k-means-initialize the codebook on encoder outputs z, (N, D)."""
        self.embedding.copy_(kmeans(z, self.embedding.shape[0], iters))
