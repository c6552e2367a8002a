"""Metrics on hand-computed cases, and streaming over batches equals one pass."""
from __future__ import annotations

import math

import pytest
import torch

from vqstudy.metrics import EvalAccumulator, code_usage, covariance, effective_dim, effective_dim_from_cov, psnr


def test_code_usage_hand_case():
    """Counts [2, 2, 0, 0]: half the codes used, 2 dead, perplexity 2, entropy log2/log4."""
    m = code_usage(torch.tensor([2, 2, 0, 0]))
    assert m["utilization"] == 0.5 and m["dead_codes"] == 2
    assert m["perplexity"] == pytest.approx(2.0)
    assert m["normalized_entropy"] == pytest.approx(0.5)


def test_code_usage_uniform_and_single():
    """Uniform use: perplexity K and entropy 1; one code: perplexity 1 and entropy 0."""
    uniform = code_usage(torch.full((8,), 5))
    assert uniform["perplexity"] == pytest.approx(8) and uniform["normalized_entropy"] == pytest.approx(1)
    single = code_usage(torch.tensor([0, 9, 0, 0]))
    assert single["perplexity"] == pytest.approx(1) and single["utilization"] == 0.25


@pytest.mark.parametrize("variances, expected", [
    ([90.0, 9.5, 0.5], 2),        # 90%, 99.5%: two components reach 99%
    ([99.5, 0.3, 0.2], 1),        # the first alone covers 99.5%
    ([1.0, 1.0, 1.0, 1.0], 4),    # isotropic: every dimension is needed
    ([0.0, 0.0], 0),              # no variance at all
])
def test_effective_dim_hand_cases(variances, expected):
    """Principal components needed for 99% of the variance of a diagonal covariance."""
    assert effective_dim_from_cov(torch.diag(torch.tensor(variances))) == expected


def test_effective_dim_of_data_on_a_plane():
    """Points on a random 3-D subspace of R^10 have effective dimension 3."""
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(10, 3)).Q.t()          # (3, 10)
    x = torch.randn(2000, 3) @ basis
    assert effective_dim(x) == 3


def test_psnr_hand_cases():
    """MSE 0.01 is 20 dB; the mean of per-image PSNRs, not the PSNR of the mean MSE."""
    assert psnr(torch.tensor([0.01])) == pytest.approx(20.0)
    assert psnr(torch.tensor([0.01, 0.0001])) == pytest.approx(30.0)


def test_accumulator_hand_case():
    """Two vectors, two codes: quant_error, recon_mse and usage by hand."""
    acc = EvalAccumulator(codebook_size=4, dim=2, modality="vector")
    z_e = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    z_q = torch.tensor([[1.0, 1.0], [0.0, 0.0]])     # errors 1 and 4 -> mean 2.5
    x = torch.zeros(2, 3)
    x_hat = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 3.0]])  # squares sum 12 over 6 elements
    acc.update(x, x_hat, z_e, z_q, torch.tensor([0, 3]))
    m = acc.compute(covariance(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])))
    assert m["quant_error"] == pytest.approx(2.5) and m["recon_mse"] == pytest.approx(2.0)
    assert m["utilization"] == 0.5 and m["dead_codes"] == 2 and m["perplexity"] == pytest.approx(2)
    assert m["codebook_effective_dim"] == 2 and m["num_codes"] == 4 and "psnr" not in m


def test_accumulator_streaming_equals_one_pass():
    """Metrics from three batches equal those from one batch of everything."""
    torch.manual_seed(0)
    x, x_hat = torch.rand(30, 1, 4, 4), torch.rand(30, 1, 4, 4)
    z_e, z_q = torch.randn(30, 2, 2, 5), torch.randn(30, 2, 2, 5)
    idx = torch.randint(0, 16, (30, 2, 2))
    one, many = EvalAccumulator(16, 5, "image"), EvalAccumulator(16, 5, "image")
    one.update(x, x_hat, z_e, z_q, idx)
    for s in (slice(0, 7), slice(7, 20), slice(20, 30)):
        many.update(x[s], x_hat[s], z_e[s], z_q[s], idx[s])
    codebook_cov = covariance(torch.randn(16, 5))
    a, b = one.compute(codebook_cov), many.compute(codebook_cov)
    assert a.keys() == b.keys() and "psnr" in a
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-9), k
    assert torch.allclose(one.encoder_covariance(), covariance(z_e.reshape(-1, 5)))
    assert math.isfinite(a["psnr"])
