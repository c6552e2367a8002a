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

Memory and time: the reference holds several N x K matrices (scores, soft and hard
one-hots); at K = 2^18 and 8,192 vectors that is tens of GB. `SoftAssignment` works in row
blocks, keeps one N x K float buffer (the softmax's exps) for the backward pass only while
it is at most `KEEP_ELEMENTS` (recomputing each block above it, for one more matmul), and
exponentiates only the entries that the entropy temperature does not round to zero. What is
left is five matmuls of the (N, K) score shape per step (scores, soft codes; in the
backward pass the soft codes' gradient, and the gradients of z and C), against the floor's one.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import QuantOut, entropy, kmeans, nearest_code, vq_losses

# Each block of scores holds at most this many floats (16 MiB: 64 rows at K = 65,536), small
# enough for the exps and sums that follow its matmul to find it in cache.
BLOCK_ELEMENTS = 2**22
# The backward pass reuses the forward's exps while N x K floats are at most this many (1 GiB),
# and recomputes them block by block above it.
KEEP_ELEMENTS = 2**28


class SoftAssignment(torch.autograd.Function):
    """For scores s = z C^T, row-blocked: the hard code index argmax_k s, the soft codes
    softmax(s) sg(C), the mean per-sample entropy of p = softmax(s / t) and the batch-mean p.

    Where the time goes, and what each block does about it. The floor of any exact method is
    the (N, K) score matmul; on top of it a softmax needs an exp of every score, and the
    backward pass the softmax's weights again. So each block (1) writes its scores once, in
    place, as d = s - max (the log of softmax(s)'s numerator), (2) turns d into
    e = exp(d) in place and takes the soft codes and their normalizer from one matmul
    e [C | 1], and (3) keeps e for the backward pass while n x K floats fit in
    `KEEP_ELEMENTS` (else the backward pass recomputes the block: one more matmul and exp).
    At the entropy temperature t (0.01 by default) p is exp(d / t) / sum, which is exactly 0
    in float wherever d / t is below exp's underflow: on the CPU only the block's entries
    above it (`hot`, typically a few per row) are exponentiated and kept, as (row, code,
    d) triples; a block where more than 1/8 of the entries are hot (scores close together,
    early in training) is done densely. On CUDA, where the exps are cheap and a count would
    be a host sync, every block is dense."""

    @staticmethod
    def forward(ctx, z, codebook, temperature: float, rows: int, keep: bool, sparse: bool, workspace: Tensor):
        n, k = z.shape[0], codebook.shape[0]
        with_ones = torch.cat([codebook, codebook.new_ones(k, 1)], 1)                 # (K, D + 1): [C | 1]
        e = workspace[:(n if keep else min(rows, n)) * k].view(-1, k)                  # (N or rows, K) scores -> exps
        idx = torch.empty(n, dtype=torch.long, device=z.device)
        soft, m, norm = torch.empty_like(z), z.new_empty(n), z.new_empty(n)
        tempered = Tempered(n, k, temperature, z)
        for i in range(0, n, rows):
            block = e[i:i + rows] if keep else e[:min(rows, n - i)]
            torch.mm(z[i:i + rows], codebook.t(), out=block)                          # s
            m[i:i + rows], idx[i:i + rows] = block.max(1)
            block.sub_(m[i:i + rows, None])                                            # d = s - max
            tempered.forward_block(i, block, sparse)
            block.exp_()                                                               # e = exp(d)
            weighted = block @ with_ones                                               # (rows, D + 1)
            norm[i:i + rows] = weighted[:, -1]
            soft[i:i + rows] = weighted[:, :-1] / weighted[:, -1:]
        ctx.save_for_backward(z, codebook, soft, m, norm, *((e,) if keep else ()))
        ctx.tempered, ctx.rows, ctx.keep = tempered, rows, keep
        ctx.mark_non_differentiable(idx)
        return idx, soft, tempered.sample_entropy, tempered.mean_p

    @staticmethod
    def backward(ctx, _, grad_soft, grad_entropy, grad_mean_p):
        z, codebook, soft, m, norm, *kept = ctx.saved_tensors
        n, rows, tempered = z.shape[0], ctx.rows, ctx.tempered
        grad_z, grad_c = torch.empty_like(z), torch.zeros_like(codebook)
        tempered.start_backward(grad_entropy, grad_mean_p)
        # d softmax(s) C / ds = p1 (g1 - sum_k p1 g1) with g1 = grad_soft C^T (C is sg in soft),
        # sum_k p1 g1 = grad_soft . soft and p1 = e / norm: the 1 / norm is taken on (N, D) here.
        scaled = grad_soft / norm[:, None]
        offset = (scaled * soft).sum(1, keepdim=True)
        # (rows, K) buffers reused block to block: a fresh 16 MiB block is fresh pages each time
        g1, d_buf, e_buf = (z.new_empty(min(rows, n), codebook.shape[0]) if j == 0 or not ctx.keep else None
                            for j in range(3))
        for i in range(0, n, rows):
            zi = z[i:i + rows]
            size = zi.shape[0]
            d = None
            if ctx.keep:
                e = kept[0][i:i + rows]
            else:                                                                      # recomputed
                d = torch.addmm(-m[i:i + rows, None], zi, codebook.t(), out=d_buf[:size])
                e = torch.exp(d, out=e_buf[:size])
            grad_s = torch.mm(scaled[i:i + rows], codebook.t(), out=g1[:size]).sub_(offset[i:i + rows]).mul_(e)
            tempered.backward_block(i, grad_s, d, zi, codebook, m)
            grad_z[i:i + rows] = grad_s @ codebook
            grad_c.addmm_(grad_s.t(), zi)
        return grad_z, grad_c, None, None, None, None, None


class Tempered:
    """The entropy terms' half of a SoftAssignment: p = softmax(s / t) per row, its mean
    per-sample entropy and its batch mean (forward), and their gradient into the scores
    (backward), block by block, sparse (hot entries only) or dense."""

    def __init__(self, n: int, k: int, temperature: float, like: Tensor):
        tiny = torch.finfo(like.dtype)
        self.t, self.n = temperature, n
        self.cutoff = temperature * (math.log(tiny.smallest_normal * tiny.eps) - 1)  # exp(d / t) == 0 below
        self.mean_p, self.sample_entropy = like.new_zeros(k), like.new_zeros(())
        self.log_norm, self.entropy = like.new_empty(n), like.new_empty(n)            # log sum exp(d / t), H(p)
        self.hot: dict[int, tuple[Tensor, Tensor, Tensor]] = {}                      # block start -> (row, code, d)

    def forward_block(self, i: int, d: Tensor, sparse: bool) -> None:
        rows, t = d.shape[0], self.t
        if sparse:
            hot = (d > self.cutoff).nonzero()
            if hot.shape[0] <= d.numel() // 8:
                r, c = hot.unbind(1)
                dv = d[r, c]
                self.hot[i] = (r, c, dv)
                et = (dv / t).exp()
                norm = d.new_zeros(rows).index_add_(0, r, et)
                p = et / norm[r]
                self._keep(i, norm.log(), d.new_zeros(rows).index_add_(0, r, p * dv) / t)
                self.mean_p.index_add_(0, c, p / self.n)
                return
        et = (d / t).exp()                                                             # (rows, K)
        norm = et.sum(1)
        p = et.div_(norm[:, None])
        self._keep(i, norm.log(), (p * d).sum(1) / t)
        self.mean_p += p.sum(0) / self.n

    def _keep(self, i: int, log_norm: Tensor, mean_scaled_d: Tensor) -> None:
        """H(p) = log sum exp(d / t) - sum p d / t, per row."""
        rows = log_norm.shape[0]
        self.log_norm[i:i + rows] = log_norm
        self.entropy[i:i + rows] = log_norm - mean_scaled_d
        self.sample_entropy += self.entropy[i:i + rows].sum() / self.n

    def start_backward(self, grad_entropy: Tensor, grad_mean_p: Tensor) -> None:
        self.grad_p, self.grad_h = grad_mean_p / self.n, grad_entropy / self.n

    def backward_block(self, i: int, grad_s: Tensor, d: Tensor | None, zi: Tensor, codebook: Tensor,
                       m: Tensor) -> None:
        """Adds the entropy terms' gradient with respect to the block's scores into grad_s:
        p (g - sum_k p g) / t with g = dL/dp = grad_mean_p / n - grad_entropy / n (log p + H)."""
        rows, t, a, e = grad_s.shape[0], self.t, self.grad_p, self.grad_h
        log_norm, h = self.log_norm[i:i + rows], self.entropy[i:i + rows]
        if i in self.hot:
            r, c, dv = self.hot[i]
            log_p = dv / t - log_norm[r]
            p = log_p.exp()
            g = a[c] - e * (log_p + h[r])
            mean_g = grad_s.new_zeros(rows).index_add_(0, r, p * g)
            grad_s.index_put_((r, c), p * (g - mean_g[r]) / t, accumulate=True)
            return
        if d is None:                                                                  # e was kept, d was not
            d = torch.addmm(-m[i:i + rows, None], zi, codebook.t())
        log_p = d / t - log_norm[:, None]
        p = log_p.exp()
        g = a - e * (log_p + h[:, None])
        grad_s += p * (g - (g * p).sum(1, keepdim=True)) / t


class IBQ(nn.Module):
    def __init__(self, dim: int, codebook_size: int, *, beta: float = 0.25, codebook_weight: float = 1.0,
                 sample_entropy_weight: float = 0.1, batch_entropy_weight: float = 0.1,
                 entropy_temperature: float = 0.01):
        super().__init__()
        self.beta, self.codebook_weight = beta, codebook_weight
        self.sample_entropy_weight, self.batch_entropy_weight = sample_entropy_weight, batch_entropy_weight
        self.entropy_temperature = entropy_temperature
        self.num_codes = codebook_size
        self.scores: Tensor | None = None                                 # SoftAssignment's workspace (not state)
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
        n, k = flat.shape[0], self.num_codes
        rows, keep = max(1, BLOCK_ELEMENTS // k), n * k <= KEEP_ELEMENTS
        idx, soft, sample_entropy, mean_p = SoftAssignment.apply(
            flat.float(), self.embedding, self.entropy_temperature, rows, keep, flat.device.type == "cpu",
            self._workspace((n if keep else min(rows, n)) * k, flat.device))
        q = F.embedding(idx, self.embedding)                              # (N, D) hard codes
        z_q = q + soft - soft.detach()                                    # value q; gradient via the softmax to all codes
        losses = {"index_backprop": F.mse_loss(z_q, flat), **vq_losses(flat, q, self.beta, self.codebook_weight),
                  "sample_entropy": self.sample_entropy_weight * sample_entropy,
                  "batch_entropy": -self.batch_entropy_weight * entropy(mean_p)}
        return QuantOut(z_q.view_as(z), idx.view(z.shape[:-1]), losses)

    def _workspace(self, size: int, device: torch.device) -> Tensor:
        """The score buffer, reused from step to step: a fresh 1 GiB buffer costs ~0.25 s of
        page faults per step on the CPU. Reusing it while an earlier step's graph still waits
        for its backward pass makes that backward raise (autograd's in-place check), never
        return wrong gradients."""
        if self.scores is None or self.scores.numel() < size or self.scores.device != device:
            self.scores = torch.empty(size, device=device)
        return self.scores

    def decode(self, indices: Tensor) -> Tensor:
        return F.embedding(indices, self.embedding)

    @torch.no_grad()
    def init_from_data(self, z: Tensor, iters: int = 10) -> None:
        """k-means-initialize the codebook on encoder outputs z, (N, D)."""
        self.embedding.copy_(kmeans(z, self.embedding.shape[0], iters))
