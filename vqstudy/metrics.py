"""Codebook-health and reconstruction metrics, over the whole eval set.

Each metric's name, direction and meaning are in the catalogue (catalogue.py). A single batch undercounts the codes in use when K is larger than the batch, which is
exactly the regime the scaling studies probe, so `EvalAccumulator` streams every eval
batch into code counts and second moments, and the pure functions below turn those into:

- `utilization`: fraction of the K codes used at least once;  `dead_codes`: K - used;
  `num_codes`: K itself, as the quantizer has it (FSQ: the product of its levels, e.g.
  1000 for `codebook_size` 1024); codes are counted by index, never by distance;
- `perplexity` = exp(H) of the code distribution; `normalized_entropy` = H / log K;
- `quant_error`: mean ||z_e - z_q||^2 per vector; `recon_mse`: mean squared error per element;
- `psnr`: mean over images of 10 log10(1 / mse) (pixels in [0, 1]);
- `effective_dim`: principal components of the encoder outputs covering 99% of their
  variance (embedding collapse, "Early Quantization Shrinks Codebook");
  `codebook_effective_dim`: the same for the codes.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .catalogue import METRICS

VARIANCE_COVERED = 0.99


def code_usage(counts: Tensor) -> dict[str, float]:
    """Usage statistics of a (K,) tensor of assignment counts."""
    k = counts.numel()
    total = counts.sum().item()
    used = int((counts > 0).sum().item())
    p = counts[counts > 0].double() / max(total, 1)
    entropy = float(-(p * p.log()).sum()) if total else 0.0
    return {
        "utilization": used / k,
        "dead_codes": k - used,
        "perplexity": math.exp(entropy),
        "normalized_entropy": entropy / math.log(k),
    }


def effective_dim_from_cov(cov: Tensor, covered: float = VARIANCE_COVERED) -> float:
    """Smallest number of principal components whose variance reaches `covered` of the total
    (NaN for a non-finite covariance, i.e. a diverged model)."""
    if not torch.isfinite(cov).all():
        return math.nan
    eig = torch.linalg.eigvalsh(cov.double()).clamp_min(0).flip(0)     # descending
    total = eig.sum()
    if total <= 0:
        return 0
    share = eig.cumsum(0) / total
    return int((share < covered - 1e-12).sum().item()) + 1


def covariance(x: Tensor) -> Tensor:
    """(D, D) covariance of the rows of x, (N, D), in float64."""
    x = x.double()
    x = x - x.mean(0, keepdim=True)
    return x.t() @ x / max(x.shape[0] - 1, 1)


def effective_dim(x: Tensor, covered: float = VARIANCE_COVERED) -> float:
    return effective_dim_from_cov(covariance(x), covered)


def codebook_covariance(quantizer) -> Tensor:
    """(D, D) covariance of a quantizer's codes, uniform over all K: in closed form for the
    implicit codebooks (FSQ, LFQ: no K x D matrix at K = 2^18), else from the codes."""
    implicit = getattr(quantizer, "implicit_covariance", None)
    return implicit() if implicit is not None else covariance(quantizer.codebook.detach())


def psnr(mse_per_image: Tensor) -> float:
    """Mean PSNR in dB of images in [0, 1], from their per-image MSEs."""
    return float((10 * torch.log10(1 / mse_per_image.double().clamp_min(1e-10))).mean())


class EvalAccumulator:
    """Streams eval batches; `compute()` gives the metrics over everything seen."""

    def __init__(self, codebook_size: int, dim: int, modality: str, device=None):
        self.images = METRICS["psnr"].applies_to(modality)   # pixels in [0, 1]
        self.counts = torch.zeros(codebook_size, dtype=torch.long, device=device)
        self.z_sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.z_outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.n_vectors = 0
        self.quant_sq = 0.0
        self.recon_sq = 0.0
        self.n_elements = 0
        self.psnr_sum = 0.0
        self.n_examples = 0

    @torch.no_grad()
    def update(self, x: Tensor, x_hat: Tensor, z_e: Tensor, z_q: Tensor, indices: Tensor) -> None:
        flat = z_e.reshape(-1, z_e.shape[-1]).double()                   # (N, D)
        self.counts += torch.bincount(indices.reshape(-1), minlength=self.counts.numel())
        self.z_sum += flat.sum(0)
        self.z_outer += flat.t() @ flat
        self.n_vectors += flat.shape[0]
        self.quant_sq += float((z_e - z_q).double().pow(2).sum())
        err = (x_hat.double() - x.double()).pow(2).reshape(x.shape[0], -1)  # (B, pixels)
        self.recon_sq += float(err.sum())
        self.n_elements += err.numel()
        if self.images:
            self.psnr_sum += psnr(err.mean(1)) * x.shape[0]
        self.n_examples += x.shape[0]

    def encoder_covariance(self) -> Tensor:
        n = self.n_vectors
        mean = self.z_sum / n
        return (self.z_outer - n * torch.outer(mean, mean)) / max(n - 1, 1)

    def compute(self, codebook_cov: Tensor) -> dict[str, float]:
        """The metrics, given the (D, D) covariance of the codes (`codebook_covariance`)."""
        metrics = {
            "recon_mse": self.recon_sq / self.n_elements,
            **code_usage(self.counts),
            "num_codes": self.counts.numel(),
            "quant_error": self.quant_sq / self.n_vectors,
            "effective_dim": effective_dim_from_cov(self.encoder_covariance()),
            "codebook_effective_dim": effective_dim_from_cov(codebook_cov),
        }
        if self.images:
            metrics["psnr"] = self.psnr_sum / self.n_examples
        return metrics
