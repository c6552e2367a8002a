"""Math every quantizer shares, written once: the output contract, chunked nearest-code
search, the straight-through and rotation-trick gradient estimators, the VQ and entropy
losses, k-means and EMA, and the projections around the implicit codebooks (FSQ, LFQ).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Nearest-code search works on row blocks whose (rows, K) distance block holds at most this
# many floats (128 MiB): K = 262,144 then needs 128 rows a block instead of a 4 GiB matrix.
SEARCH_BLOCK_ELEMENTS = 2**25


class QuantOut(NamedTuple):
    """What every quantizer returns. `z_q` carries the gradient estimator; `losses` are
    named and already weighted (e.g. `commitment` includes beta), never pre-summed."""
    z_q: Tensor                 # (..., D), same shape as the input z
    indices: Tensor             # (...,) long, code index per vector
    losses: dict[str, Tensor]   # name -> scalar


@torch.no_grad()
def nearest_code(z: Tensor, codebook: Tensor, block_elements: int = SEARCH_BLOCK_ELEMENTS, *,
                 inner_product: bool = False) -> Tensor:
    """Index of the nearest code (L2) for each row of z, never holding the full N x K matrix;
    with `inner_product`, of the code with the largest z.c_k instead (IBQ's logits).

    argmin_k ||z - c_k||^2 = argmin_k (||c_k||^2 - 2 z.c_k): ||z||^2 is constant per row.
    """
    z, codebook = z.float(), codebook.float()          # z (N, D), codebook (K, D)
    n, k = z.shape[0], codebook.shape[0]
    c_sq = codebook.new_zeros(k) if inner_product else codebook.pow(2).sum(1)  # (K,)
    rows = max(1, block_elements // k)
    out = torch.empty(n, dtype=torch.long, device=z.device)
    for i in range(0, n, rows):
        dist = torch.addmm(c_sq, z[i:i + rows], codebook.t(), alpha=-2.0)  # (rows, K)
        out[i:i + rows] = dist.argmin(1)
    return out


def lookup(z: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Nearest codes for channel-last z: (z flattened (N, D), indices (N,), codes shaped like z)."""
    flat = z.reshape(-1, z.shape[-1])
    idx = nearest_code(flat, codebook)
    return flat, idx, F.embedding(idx, codebook).view_as(z)


def quant_out(z: Tensor, q: Tensor, idx: Tensor, losses: dict[str, Tensor], use_rotation: bool) -> QuantOut:
    """Package a quantization: z_q carries the chosen gradient estimator; indices shaped like z's batch."""
    return QuantOut(estimate_gradient(z, q, use_rotation), idx.view(z.shape[:-1]), losses)


def straight_through(z: Tensor, q: Tensor) -> Tensor:
    """Forward value q, gradient copied to z unchanged (VQ-VAE, van den Oord et al. 2017)."""
    return z + (q - z).detach()


def rotation_trick(z: Tensor, q: Tensor, eps: float = 1e-6) -> Tensor:
    """Forward value q; the gradient reaching z is rotated and scaled as q is from z
    ("Restructuring Vector Quantization with the Rotation Trick", Fifty et al. 2024).

    q = lambda * R z with R the rotation taking z/|z| to q/|q| and lambda = |q|/|z|, both
    treated as constants. R z = z - 2 (z.w) w + 2 (z.u) q_hat with u = z/|z|, w = (u + q_hat)/|u + q_hat|.
    """
    z_norm = z.norm(dim=-1, keepdim=True).clamp_min(eps)
    q_norm = q.norm(dim=-1, keepdim=True).clamp_min(eps)
    u = (z / z_norm).detach()
    q_hat = (q / q_norm).detach()
    w = F.normalize(u + q_hat, dim=-1, eps=eps).detach()
    rotated = z - 2 * (z * w).sum(-1, keepdim=True) * w + 2 * (z * u).sum(-1, keepdim=True) * q_hat
    return rotated * (q_norm / z_norm).detach()


def estimate_gradient(z: Tensor, q: Tensor, use_rotation: bool) -> Tensor:
    """z_q for the decoder: q itself when no gradient is wanted (exact, e.g. in eval),
    else q carrying the chosen estimator's gradient to z."""
    if not (torch.is_grad_enabled() and z.requires_grad):
        return q
    return rotation_trick(z, q) if use_rotation else straight_through(z, q)


def vq_losses(z: Tensor, q: Tensor, beta: float, codebook_weight: float | None = 1.0) -> dict[str, Tensor]:
    """VQ-VAE's two terms: `codebook` moves codes to encoder outputs (weight 1 in the paper;
    None: no such term, as for EMA codebooks), `commitment` keeps encoder outputs near their
    codes (weight beta)."""
    losses = {"commitment": beta * F.mse_loss(z, q.detach())}
    if codebook_weight is not None:
        losses["codebook"] = codebook_weight * F.mse_loss(q, z.detach())
    return losses


def entropy(p: Tensor) -> Tensor:
    """Entropy in nats of the distribution p (its last dimension; summed over any others).
    The batch term of MAGVIT-v2's entropy penalty ("Language Model Beats Diffusion", Yu et
    al. 2023) that IBQ and LFQ maximize, on the batch-mean soft assignment."""
    return -(p * p.clamp_min(1e-30).log()).sum()


def ema_inplace(average: Tensor, new: Tensor, decay: float) -> None:
    average.mul_(decay).add_(new, alpha=1 - decay)


@torch.no_grad()
def sample_rows(x: Tensor, n: int) -> Tensor:
    """n rows of x: without replacement when x has enough rows, else with replacement and
    a little noise so that repeated rows become distinct codes."""
    if x.shape[0] >= n:
        return x[torch.randperm(x.shape[0], device=x.device)[:n]].clone()
    picked = x[torch.randint(0, x.shape[0], (n,), device=x.device)]
    return picked + 1e-3 * x.std(0, keepdim=True) * torch.randn_like(picked)


@torch.no_grad()
def kmeans(x: Tensor, k: int, iters: int = 10) -> Tensor:
    """Lloyd's k-means of the rows of x into k centroids, (k, D). Empty clusters keep
    their previous centroid. Uses the global torch RNG, so it is seeded with the trial."""
    x = x.float()                                      # (N, D)
    centroids = sample_rows(x, k)                      # (k, D)
    for _ in range(iters):
        idx = nearest_code(x, centroids)               # (N,)
        counts = torch.bincount(idx, minlength=k)      # (k,)
        sums = torch.zeros_like(centroids).index_add_(0, idx, x)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
    return centroids


# -- implicit codebooks (FSQ, LFQ): a d-channel grid between two projections ----------------
def projection(dim: int, d: int) -> tuple[nn.Module, nn.Module]:
    """Linear maps D -> d and d -> D around a d-channel quantizer (identities when D == d)."""
    if dim == d:
        return nn.Identity(), nn.Identity()
    return nn.Linear(dim, d), nn.Linear(d, dim)


def projected_covariance(channel_cov: Tensor, project_out: nn.Module) -> Tensor:
    """(D, D) covariance of project_out(c) for codes c with (d, d) covariance `channel_cov`."""
    if isinstance(project_out, nn.Identity):
        return channel_cov
    w = project_out.weight.detach().double()            # (D, d)
    return w @ channel_cov @ w.t()
