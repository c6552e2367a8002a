"""Quantizers: the shared contract over the whole registry, then each method's own behaviour."""
from __future__ import annotations

import pytest
import torch

from vqstudy.config import ConfigError
from vqstudy.quantizers import QUANTIZERS, QuantOut, build_quantizer, nearest_code
from vqstudy.quantizers._common import kmeans, rotation_trick, straight_through

D, K = 8, 64


def make(name: str, **options):
    torch.manual_seed(0)
    return build_quantizer(name, dim=D, codebook_size=K, **options)


@pytest.mark.parametrize("rotation", [False, True], ids=["ste", "rotation"])
@pytest.mark.parametrize("name", list(QUANTIZERS))
@pytest.mark.parametrize("shape", [(32, D), (4, 5, 6, D)], ids=["vectors", "grid"])
def test_contract(name, shape, rotation):
    """Shape kept, indices in [0, K), losses finite scalars, gradient reaches the input."""
    q = make(name, rotation_trick=rotation)
    z = torch.randn(*shape, requires_grad=True)
    out = q(z)
    assert isinstance(out, QuantOut)
    assert out.z_q.shape == z.shape and out.indices.shape == shape[:-1]
    assert out.indices.dtype == torch.long and 0 <= out.indices.min() and out.indices.max() < K
    assert out.losses and all(v.ndim == 0 and torch.isfinite(v) for v in out.losses.values())
    (out.z_q.square().sum() + sum(out.losses.values())).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


@pytest.mark.parametrize("name", list(QUANTIZERS))
def test_decode_inverts_indices_in_eval(name):
    """decode(indices) gives back z_q exactly, and z_q are codebook rows."""
    q = make(name).eval()
    z = torch.randn(3, 7, D)
    with torch.no_grad():
        out = q(z)
        assert torch.equal(q.decode(out.indices), out.z_q)
        assert torch.allclose(out.z_q, q.codebook[out.indices])


@pytest.mark.parametrize("name", list(QUANTIZERS))
def test_picks_the_nearest_code(name):
    """The chosen code is the L2-nearest one (checked against a brute-force cdist)."""
    q = make(name).eval()
    z = torch.randn(50, D)
    with torch.no_grad():
        idx = q(z).indices
        expected = torch.cdist(z, q.codebook).argmin(1)
    assert torch.equal(idx, expected)


def test_unknown_name_lists_the_registry():
    """build_quantizer refuses unknown names, listing every registered one."""
    with pytest.raises(ConfigError, match="'vqq' is not one of vq, ema, simvq"):
        build_quantizer("vqq", dim=D, codebook_size=K)


def test_unknown_option_lists_the_allowed_ones():
    """An option the method does not take is refused, naming the ones it does."""
    with pytest.raises(ConfigError, match="unknown option 'decay' \\(allowed: beta, rotation_trick\\)"):
        build_quantizer("vq", dim=D, codebook_size=K, decay=0.9)


def test_chunked_search_matches_full_matrix():
    """Row-blocked nearest-code search equals argmin over the full distance matrix."""
    torch.manual_seed(0)
    z, codebook = torch.randn(1000, 16), torch.randn(3000, 16)
    full = torch.cdist(z, codebook).argmin(1)
    assert torch.equal(nearest_code(z, codebook, block_elements=5000), full)   # 1 row a block
    assert torch.equal(nearest_code(z, codebook, block_elements=10**6), full)  # 333 rows a block


def test_large_codebook_search_runs_in_blocks():
    """K = 262,144 works with a small block budget (the N x K matrix would be 1 GiB here)."""
    torch.manual_seed(0)
    codebook = torch.randn(2**18, 4)
    z = codebook[[5, 70_000, 262_143]] + 1e-4
    assert nearest_code(z, codebook, block_elements=2**20).tolist() == [5, 70_000, 262_143]


def test_vq_losses_weights():
    """vq: codebook term has weight 1, commitment term weight beta, same MSE value."""
    q = make("vq", beta=0.25)
    out = q(torch.randn(16, D))
    assert torch.allclose(out.losses["commitment"], 0.25 * out.losses["codebook"])


def test_vq_codebook_loss_trains_only_selected_codes():
    """vq: the codebook loss moves the selected codes and leaves the others alone."""
    q = make("vq")
    out = q(torch.randn(4, D))
    out.losses["codebook"].backward()
    touched = q.embedding.grad.abs().sum(1) > 0
    assert set(touched.nonzero().flatten().tolist()) == set(out.indices.tolist())


def test_ema_moves_codes_to_their_data_in_training_only():
    """ema: a training forward pulls used codes toward their vectors; eval changes nothing."""
    q = make("ema", decay=0.5)
    z = torch.randn(256, D) + 3.0
    before = q.embedding.clone()
    q.eval()(z)
    assert torch.equal(q.embedding, before)
    q.train()
    idx = q(z).indices
    used = idx.unique()
    dist_before = (before[idx] - z).norm(dim=1).mean()
    dist_after = (q.embedding[idx] - z).norm(dim=1).mean()
    assert dist_after < dist_before
    unused = torch.ones(K, dtype=torch.bool)
    unused[used] = False
    assert torch.allclose(q.embedding[unused], before[unused], atol=1e-4)


def test_ema_restarts_dead_codes_from_batch_vectors():
    """ema: with a threshold, codes whose usage fell below it are replaced by batch vectors."""
    q = make("ema", dead_code_threshold=0.5, decay=0.9)
    z = torch.randn(128, D) * 0.01 + 5.0      # far from every initial code: one code wins
    for _ in range(7):                         # unused codes' EMA usage: 0.9^7 = 0.48 < 0.5
        q(z)
    rows = {tuple(r) for r in z.tolist()}
    restarted = [i for i in range(K) if tuple(q.embedding[i].tolist()) in rows]
    assert len(restarted) >= K - 2             # every code but the winner(s) restarted
    assert (q.cluster_size >= 0.5 - 1e-6).all()


def test_simvq_codebook_is_frozen_c_times_w():
    """simvq: codes = C W; C is a frozen buffer with std D^-1/2; W receives the gradient."""
    torch.manual_seed(0)
    q = build_quantizer("simvq", dim=64, codebook_size=4096)
    c = q.frozen_codebook
    assert not isinstance(c, torch.nn.Parameter) and abs(c.std().item() - 64**-0.5) < 0.005
    assert torch.allclose(q.codebook, c @ q.proj.weight.t())
    out = q(torch.randn(32, 64))
    out.losses["codebook"].backward()
    assert q.proj.weight.grad.abs().sum() > 0
    assert [n for n, p in q.named_parameters()] == ["proj.weight"]


def test_simvq_one_step_moves_every_code():
    """simvq: one optimizer step on W moves all K codes, not just the selected ones."""
    q = make("simvq")
    before = q.codebook.detach().clone()
    opt = torch.optim.SGD(q.parameters(), lr=0.1)
    out = q(torch.randn(4, D))
    sum(out.losses.values()).backward()
    opt.step()
    moved = (q.codebook.detach() - before).norm(dim=1) > 0
    assert moved.all() and out.indices.unique().numel() <= 4


def test_rotation_trick_scales_gradient_for_parallel_vectors():
    """Rotation trick: q = 2z (same direction) gives gradient 2x upstream; STE gives 1x."""
    z = torch.tensor([[1.0, 2.0, -1.0]], requires_grad=True)
    q = 2 * z.detach()
    out = rotation_trick(z, q)
    assert torch.allclose(out, q)
    out.sum().backward()
    assert torch.allclose(z.grad, torch.full_like(z, 2.0))
    z.grad = None
    straight_through(z, q).sum().backward()
    assert torch.allclose(z.grad, torch.ones_like(z))


def test_rotation_trick_rotates_gradient():
    """Rotation trick: for q at 90 degrees from z, the gradient is rotated by the same angle."""
    z = torch.tensor([[1.0, 0.0]], requires_grad=True)
    q = torch.tensor([[0.0, 1.0]])
    out = rotation_trick(z, q)
    assert torch.allclose(out, q, atol=1e-6)
    (out * torch.tensor([[0.0, 1.0]])).sum().backward()   # upstream gradient along q
    assert torch.allclose(z.grad, torch.tensor([[1.0, 0.0]]), atol=1e-6)  # arrives along z


def test_kmeans_finds_separated_clusters():
    """k-means recovers the centres of well-separated clusters."""
    torch.manual_seed(0)
    centres = torch.tensor([[10.0, 0.0], [-10.0, 0.0], [0.0, 10.0]])
    x = centres.repeat_interleave(100, 0) + 0.1 * torch.randn(300, 2)
    found = kmeans(x, 3, iters=20)
    err = torch.cdist(centres, found).min(1).values
    assert (err < 0.2).all()


@pytest.mark.parametrize("name", [n for n in QUANTIZERS if hasattr(QUANTIZERS[n], "init_from_data")])
def test_kmeans_init_more_codes_than_data(name):
    """k-means init with K larger than the sample still gives K finite, distinct codes."""
    q = make(name)
    q.init_from_data(torch.randn(20, D), iters=3)
    assert torch.isfinite(q.codebook).all() and q.codebook.unique(dim=0).shape[0] == K
