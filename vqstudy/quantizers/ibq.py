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
every method.

Memory: the reference holds several N x K matrices (scores, soft and hard one-hots); at
K = 2^18 and 8,192 vectors that is tens of GB. `SoftAssignment` computes the soft codes
and both entropy terms in row blocks and recomputes each block in the backward pass, so a
step holds O(block x K) instead, for one extra matmul.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import SEARCH_BLOCK_ELEMENTS, QuantOut, entropy, kmeans, nearest_code, vq_losses


class SoftAssignment(torch.autograd.Function):
    """For scores s = z C^T, row-blocked: the hard code index argmax_k s, the soft codes
    softmax(s) sg(C), the mean per-sample entropy of p = softmax(s / t) and the batch-mean p.
    Backward recomputes each block's scores; nothing of size N x K is kept."""

    @staticmethod
    def forward(ctx, z, codebook, temperature: float, rows: int):
        n, k = z.shape[0], codebook.shape[0]
        idx = torch.empty(n, dtype=torch.long, device=z.device)
        soft = torch.empty_like(z)                                          # (N, D)
        mean_p = z.new_zeros(k)                                             # (K,)
        sample_entropy = z.new_zeros(())
        for i in range(0, n, rows):
            s = z[i:i + rows] @ codebook.t()                                # (rows, K)
            idx[i:i + rows] = s.argmax(1)
            soft[i:i + rows] = s.softmax(1) @ codebook
            log_p = (s / temperature).log_softmax(1)
            p = log_p.exp()
            sample_entropy -= (p * log_p).sum() / n
            mean_p += p.sum(0) / n
        ctx.save_for_backward(z, codebook)
        ctx.temperature, ctx.rows = temperature, rows
        ctx.mark_non_differentiable(idx)
        return idx, soft, sample_entropy, mean_p

    @staticmethod
    def backward(ctx, _, grad_soft, grad_entropy, grad_mean_p):
        z, codebook = ctx.saved_tensors
        t, n = ctx.temperature, z.shape[0]
        grad_z, grad_c = torch.zeros_like(z), torch.zeros_like(codebook)
        for i in range(0, n, ctx.rows):
            zi = z[i:i + ctx.rows]
            s = zi @ codebook.t()                                           # (rows, K), recomputed
            p1 = s.softmax(1)
            g1 = grad_soft[i:i + ctx.rows] @ codebook.t()                   # d/d softmax(s): C is sg in soft
            grad_s = p1 * (g1 - (g1 * p1).sum(1, keepdim=True))
            log_p = (s / t).log_softmax(1)
            p = log_p.exp()
            h = -(p * log_p).sum(1, keepdim=True)                           # (rows, 1) per-sample entropy
            g = grad_mean_p / n - grad_entropy / n * (log_p + h)            # d/dp of both entropy inputs
            grad_s += p * (g - (g * p).sum(1, keepdim=True)) / t
            grad_z[i:i + ctx.rows] = grad_s @ codebook
            grad_c += grad_s.t() @ zi
        return grad_z, grad_c, None, None


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
        rows = max(1, SEARCH_BLOCK_ELEMENTS // self.num_codes)
        idx, soft, sample_entropy, mean_p = SoftAssignment.apply(flat.float(), self.embedding,
                                                                 self.entropy_temperature, rows)
        q = F.embedding(idx, self.embedding)                              # (N, D) hard codes
        z_q = q + soft - soft.detach()                                    # value q; gradient via the softmax to all codes
        losses = {"index_backprop": F.mse_loss(z_q, flat), **vq_losses(flat, q, self.beta, self.codebook_weight),
                  "sample_entropy": self.sample_entropy_weight * sample_entropy,
                  "batch_entropy": -self.batch_entropy_weight * entropy(mean_p)}
        return QuantOut(z_q.view_as(z), idx.view(z.shape[:-1]), losses)

    def decode(self, indices: Tensor) -> Tensor:
        return F.embedding(indices, self.embedding)

    @torch.no_grad()
    def init_from_data(self, z: Tensor, iters: int = 10) -> None:
        """k-means-initialize the codebook on encoder outputs z, (N, D)."""
        self.embedding.copy_(kmeans(z, self.embedding.shape[0], iters))
