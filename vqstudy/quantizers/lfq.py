"""`lfq`: lookup-free quantization, from MAGVIT-v2 ("Language Model Beats Diffusion --
Tokenizer is Key to Visual Generation", Yu et al. 2023, arXiv 2310.05737).

The codebook is the corners {-1, +1}^d of a d = log2(K) dimensional cube: a vector's code
is the sign of each of its d channels, its index the bits read most significant first
(as vector-quantize-pytorch's LFQ; tests check the same input gives the same codes). No
search and no codebook to learn. z is projected D -> d and back when D != d. Losses: beta x
commitment, and the paper's entropy penalty -- per-sample entropy down, batch entropy up --
with separate weights, in training only, on softmax(2 h.c / entropy_temperature) over the
2^d codes. That softmax factorizes over the bits, so the per-sample entropy is exact from d
binary distributions at O(N d). The batch entropy is the joint one over all 2^d codes
(`batch_entropy: joint`, as MAGVIT-v2): `CodeMarginal` forms the batch-mean probability of
each code in blocks of codes, recomputed in the backward pass, so it costs N 2^d d work but
no N x 2^d memory. `batch_entropy: factorized` sums the bits' batch entropies instead
(O(N d), an upper bound, as in BSQ, Zhao et al. 2024): cheap at any K, but blind to bits
that copy one another (six identical bits score as 64 balanced codes; tests).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..implicit_codebooks import lfq_bits
from ._common import (SEARCH_BLOCK_ELEMENTS, QuantOut, entropy, estimate_gradient, projected_covariance,
                      projection)


def code_bits(indices: Tensor, bit_values: Tensor) -> Tensor:
    """Bits (..., d) in {0, 1}, most significant first, of code indices (...,)."""
    return ((indices[..., None] & bit_values) != 0).float()


class CodeMarginal(torch.autograd.Function):
    """m_c = mean_n p(c | n) for every code c, where log p(c | n) = sum_i log p_i(c_i | n) from
    the per-bit log-probabilities `log_plus`, `log_minus` (N, d); computed in blocks of codes,
    each block recomputed in the backward pass."""

    @staticmethod
    def forward(ctx, log_plus, log_minus, bit_values, block: int):
        k = 2 ** bit_values.numel()
        mean_p = log_plus.new_empty(k)                                      # (K,)
        for i in range(0, k, block):
            mean_p[i:i + block] = CodeMarginal._probs(log_plus, log_minus, bit_values, i, block)[0].mean(0)
        ctx.save_for_backward(log_plus, log_minus, bit_values)
        ctx.block = block
        return mean_p

    @staticmethod
    def _probs(log_plus, log_minus, bit_values, start: int, block: int) -> tuple[Tensor, Tensor]:
        """p(c | n) (N, block) for codes start..start+block, and their bits (block, d)."""
        stop = min(start + block, 2 ** bit_values.numel())
        bits = code_bits(torch.arange(start, stop, device=log_plus.device), bit_values).to(log_plus.dtype)
        log_p = (log_plus - log_minus) @ bits.t() + log_minus.sum(1, keepdim=True)
        return log_p.exp(), bits

    @staticmethod
    def backward(ctx, grad_mean_p):
        log_plus, log_minus, bit_values = ctx.saved_tensors
        n, k = log_plus.shape[0], 2 ** bit_values.numel()
        grad_plus, grad_minus = torch.zeros_like(log_plus), torch.zeros_like(log_minus)
        for i in range(0, k, ctx.block):
            p, bits = CodeMarginal._probs(log_plus, log_minus, bit_values, i, ctx.block)
            w = p * grad_mean_p[i:i + ctx.block] / n                         # (N, block) d/d log p(c | n)
            on = w @ bits                                                   # (N, d)
            grad_plus += on
            grad_minus += w.sum(1, keepdim=True) - on
        return grad_plus, grad_minus, None, None


class LFQ(nn.Module):
    def __init__(self, dim: int, codebook_size: int, *, beta: float = 0.25, sample_entropy_weight: float = 0.1,
                 batch_entropy_weight: float = 0.1, entropy_temperature: float = 0.01,
                 batch_entropy: str = "joint"):
        super().__init__()
        bits = lfq_bits(codebook_size)
        self.num_codes = 2**bits
        self.beta, self.batch_entropy = beta, batch_entropy
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
            losses.update(self._entropy_losses(h.reshape(-1, h.shape[-1])))
        z_q = self.project_out(estimate_gradient(h, q, use_rotation=False))
        return QuantOut(z_q.to(z.dtype), idx, losses)

    def _entropy_losses(self, h: Tensor) -> dict[str, Tensor]:
        """Per-sample entropy (minimized) and batch entropy (maximized) of the soft assignment
        softmax(2 h.c / temperature) over the codes, for h (N, d). Code c scores sum_i 2 h_i c_i,
        so bit i is +1 independently with probability sigmoid(4 h_i / temperature)."""
        logit = 4 * h / self.entropy_temperature                           # (N, d)
        log_plus, log_minus = F.logsigmoid(logit), F.logsigmoid(-logit)   # per-bit log-probabilities
        sample = -(log_plus.exp() * log_plus + log_minus.exp() * log_minus).sum(1).mean()
        if self.batch_entropy == "joint":
            block = max(1, SEARCH_BLOCK_ELEMENTS // h.shape[0])
            mean_p = CodeMarginal.apply(log_plus, log_minus, self.bit_values, block)   # (K,)
        else:
            mean_p = torch.stack((log_plus, log_minus), -1).exp().mean(0)              # (d, 2), per bit
        return {"sample_entropy": self.sample_entropy_weight * sample,
                "batch_entropy": -self.batch_entropy_weight * entropy(mean_p)}

    def codes_of(self, indices: Tensor) -> Tensor:
        """Cube corners (..., d) of code indices (...,)."""
        return code_bits(indices, self.bit_values) * 2 - 1

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
