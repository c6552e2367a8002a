"""`cvq`: "Online Clustered Codebook" (CVQ-VAE, Zheng & Vedaldi, ICCV 2023, arXiv 2307.15139;
reference code lyndonzheng/CVQ-VAE).

A VQ-VAE codebook (same losses) plus online clustering: each training step every code is
pulled toward an anchor, a feature sampled from the batch's encoder outputs, with strength
alpha_k = exp(-10 K p_k / (1 - decay) - 1e-3), where p_k is an EMA (`decay`) of code k's
share of the assignments. A used code (p_k ~ 1/K or more) has alpha ~ e^-1000 and keeps
its place; a dead code (p_k -> 0) has alpha -> 1 and jumps onto the data, so codes cannot
stay dead. `distance` (cos, the reference default, or l2) serves both the code search
and the anchor choice; `anchor`: `closest` (the batch feature nearest each code),
`probrandom` (a feature sampled per code with probability softmax over the batch of its
similarity to the code; the reference default) or `random` (uniform batch features; the
reference draws them from a feature pool across batches). Every step is chunked over K,
and codes too used to move (alpha below float32 resolution) skip the anchor search. Under
cosine distance, probrandom draws by rejection (`sample_by_cosine`: the same distribution
as the reference's multinomial, without its M x N matrix); under l2, whose similarities
have no bound, by the multinomial.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import (SEARCH_BLOCK_ELEMENTS, QuantOut, ema_inplace, kmeans, nearest_code, quant_out,
                      sample_rows, vq_losses)


@torch.no_grad()
def sample_by_cosine(codes: Tensor, x: Tensor) -> Tensor:
    """For each unit code c (M, D), the index of a row of the unit features x (N, D) drawn with
    probability softmax_i(c . x_i): the reference's multinomial over its (M, N) similarity
    matrix, by rejection instead. A cosine is at most 1, so proposing i uniformly and accepting
    it with probability exp(c . x_i - 1) draws exactly that distribution, in at most e^2 ~ 7.4
    proposals per code on average (about e^1 for codes near orthogonal to the batch): O(M D)
    work a round instead of the matrix, the softmax and M x N exponential variates."""
    n = x.shape[0]
    picks = torch.empty(codes.shape[0], dtype=torch.long, device=x.device)
    pending = torch.arange(codes.shape[0], device=x.device)
    while pending.numel():
        proposed = torch.randint(0, n, pending.shape, device=x.device)
        cos = (codes[pending] * x[proposed]).sum(1)
        accepted = torch.rand(pending.shape, device=x.device) < torch.exp(cos - 1)
        picks[pending[accepted]] = proposed[accepted]
        pending = pending[~accepted]
    return picks


class CVQ(nn.Module):
    def __init__(self, dim: int, codebook_size: int, *, beta: float = 0.25, codebook_weight: float = 1.0,
                 decay: float = 0.99, distance: str = "cos", anchor: str = "probrandom",
                 rotation_trick: bool = False):
        super().__init__()
        self.beta, self.codebook_weight, self.decay = beta, codebook_weight, decay
        self.distance, self.anchor, self.rotation_trick = distance, anchor, rotation_trick
        self.num_codes = codebook_size
        weight = torch.empty(codebook_size, dim).uniform_(-1 / codebook_size, 1 / codebook_size)
        self.embedding = nn.Parameter(weight)                              # (K, D), the reference's init
        self.register_buffer("usage", torch.zeros(codebook_size))          # (K,) p_k, EMA of assignment shares

    @property
    def codebook(self) -> Tensor:
        return self.embedding

    def _space(self, x: Tensor) -> Tensor:
        """Where distances are taken: on the unit sphere for cosine (argmax cos = argmin L2 there)."""
        return F.normalize(x, dim=-1) if self.distance == "cos" else x

    def forward(self, z: Tensor) -> QuantOut:
        flat = z.reshape(-1, z.shape[-1]).detach().float()               # (N, D)
        idx = nearest_code(self._space(flat), self._space(self.embedding.detach()))
        q = F.embedding(idx, self.embedding).view_as(z)                   # the raw codes, also under cosine
        out = quant_out(z, q, idx, vq_losses(z, q, self.beta, self.codebook_weight), self.rotation_trick)
        if self.training:
            self._cluster(flat, idx)
        return out

    @torch.no_grad()
    def _cluster(self, feats: Tensor, idx: Tensor) -> None:
        """Pull each code toward its anchor by alpha_k (after z_q was taken: the step's
        gradient still goes to the codes it used). Codes whose alpha is below float32
        resolution (at decay 0.99: used above ~1/60,000 of the uniform rate) would not move: they
        get no anchor, which makes a healthy codebook's step cheap."""
        k = self.num_codes
        ema_inplace(self.usage, torch.bincount(idx, minlength=k).float() / idx.numel(), self.decay)
        alpha = torch.exp(-self.usage * k * 10 / (1 - self.decay) - 1e-3)  # (K,)
        pulled = (alpha > torch.finfo(torch.float32).eps / 2).nonzero().squeeze(1)
        if pulled.numel():
            codes = self.embedding[pulled]
            self.embedding[pulled] = codes.lerp(self._anchors(codes, feats), alpha[pulled, None])

    def _anchors(self, codes: Tensor, feats: Tensor) -> Tensor:
        """One batch feature per code, (M, D) for codes (M, D)."""
        m = codes.shape[0]
        if self.anchor == "random":
            return sample_rows(feats, m)
        codes, x = self._space(codes.float()), self._space(feats)
        if self.anchor == "closest":
            return feats[nearest_code(codes, x)]
        if self.distance == "cos":
            return feats[sample_by_cosine(codes, x)]
        picks = torch.empty(m, dtype=torch.long, device=feats.device)
        rows = max(1, SEARCH_BLOCK_ELEMENTS // feats.shape[0])
        for i in range(0, m, rows):                                        # probrandom, (rows, N) at a time
            sim = -torch.cdist(codes[i:i + rows], x).square()
            picks[i:i + rows] = torch.multinomial(sim.softmax(1), 1).squeeze(1)
        return feats[picks]

    def decode(self, indices: Tensor) -> Tensor:
        return F.embedding(indices, self.embedding)

    @torch.no_grad()
    def init_from_data(self, z: Tensor, iters: int = 10) -> None:
        """k-means-initialize the codebook on encoder outputs z, (N, D)."""
        self.embedding.copy_(kmeans(z, self.num_codes, iters))
