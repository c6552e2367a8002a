"""Quantizers: the shared contract over the whole registry, then each method's own behaviour."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vqstudy.config import ConfigError
from vqstudy.metrics import codebook_covariance, covariance
from vqstudy.quantizers import QUANTIZERS, QuantOut, build_quantizer, nearest_code, options_of
from vqstudy.quantizers._common import kmeans, rotation_trick, straight_through

D, K = 8, 64
DEFAULTS = {"fsq": {"levels": (4, 4, 4)}}    # FSQ's paper table has no K = 64


def make(name: str, dim: int = D, codebook_size: int = K, **options):
    torch.manual_seed(0)
    options = {**DEFAULTS.get(name, {}), **options} if codebook_size == K else options
    return build_quantizer(name, dim=dim, codebook_size=codebook_size, **options)


ESTIMATORS = [(n, r) for n in QUANTIZERS for r in (False, True) if not r or "rotation_trick" in options_of(n)]


@pytest.mark.parametrize("name, rotation", ESTIMATORS, ids=[f"{n}-{'rotation' if r else 'default'}" for n, r in ESTIMATORS])
@pytest.mark.parametrize("shape", [(32, D), (4, 5, 6, D)], ids=["vectors", "grid"])
def test_contract(name, shape, rotation):
    """Shape kept, indices in [0, K), losses finite scalars, gradient reaches the input."""
    q = make(name, **({"rotation_trick": True} if rotation else {}))
    z = torch.randn(*shape, requires_grad=True)
    out = q(z)
    assert isinstance(out, QuantOut)
    assert out.z_q.shape == z.shape and out.indices.shape == shape[:-1]
    assert out.indices.dtype == torch.long and 0 <= out.indices.min() and out.indices.max() < K
    assert (out.losses or name == "fsq") and all(v.ndim == 0 and torch.isfinite(v) for v in out.losses.values())
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
        assert torch.allclose(out.z_q, q.codebook[out.indices], atol=1e-6)


@pytest.mark.parametrize("name", list(QUANTIZERS))
def test_num_codes_and_codebook_covariance(name):
    """num_codes is the codebook's size; the codes' covariance (closed form for fsq/lfq) is theirs."""
    q = make(name)
    with torch.no_grad():
        codes = q.codebook.double()
    assert q.num_codes == codes.shape[0] == K
    population = covariance(codes) * (K - 1) / K
    assert torch.allclose(codebook_covariance(q) * (1 if hasattr(q, "implicit_covariance") else (K - 1) / K),
                          population, atol=1e-6)


@pytest.mark.parametrize("name, options", [("vq", {}), ("ema", {}), ("simvq", {}), ("cvq", {"distance": "l2"})])
def test_picks_the_nearest_code(name, options):
    """The chosen code is the L2-nearest one (checked against a brute-force cdist)."""
    q = make(name, **options).eval()
    z = torch.randn(50, D)
    with torch.no_grad():
        idx = q(z).indices
        expected = torch.cdist(z, q.codebook).argmin(1)
    assert torch.equal(idx, expected)


def test_unknown_name_lists_the_registry():
    """build_quantizer refuses unknown names, listing every registered one."""
    with pytest.raises(ConfigError, match="'vqq' is not one of vq, ema, simvq, cvq, ibq, fsq, lfq"):
        build_quantizer("vqq", dim=D, codebook_size=K)


def test_unknown_option_lists_the_allowed_ones():
    """An option the method does not take is refused, naming the ones it does."""
    with pytest.raises(ConfigError, match="unknown option 'decay' \\(allowed: beta, codebook_weight, rotation_trick\\)"):
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


# -- cvq -------------------------------------------------------------------------------------
@pytest.mark.parametrize("anchor", ["closest", "probrandom", "random"])
@pytest.mark.parametrize("distance", ["l2", "cos"])
def test_cvq_dead_codes_move_onto_batch_features(distance, anchor):
    """cvq: a training step pulls unused codes (alpha ~ 1) onto batch features and leaves the
    most used code where it was (alpha ~ e^-(10 K p / (1 - decay)))."""
    q = make("cvq", distance=distance, anchor=anchor)
    feats = torch.randn(256, D) + 5.0                     # far from the codes' init in (-1/K, 1/K)
    before = q.embedding.detach().clone()
    idx = q(feats).indices
    after = q.embedding.detach()
    counts = torch.bincount(idx, minlength=K)
    dead = counts == 0
    gap = lambda codes: torch.cdist(codes, feats).min(1).values  # noqa: E731  (distance to the nearest feature)
    assert dead.sum() > K // 2
    assert (gap(after[dead]) < 0.01 * gap(before[dead])).all()
    busiest = counts.argmax()
    assert torch.allclose(after[busiest], before[busiest], atol=1e-6)


def test_cvq_cosine_anchors_are_drawn_from_the_softmax():
    """cvq: probrandom's rejection sampler draws feature i for a code with probability
    softmax_i(cos(code, x_i)), the reference's multinomial (chi-square over 40,000 draws)."""
    from vqstudy.quantizers.cvq import sample_by_cosine

    torch.manual_seed(0)
    x = F.normalize(torch.randn(6, D), dim=1)
    code = F.normalize(x[0] + 0.3 * torch.randn(D), dim=0)
    draws = 40_000
    counts = torch.bincount(sample_by_cosine(code.expand(draws, D), x), minlength=6).double()
    expected = draws * (x @ code).double().softmax(0)
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 20.5          # chi-square with 5 degrees of freedom: p = 0.001


def test_cvq_healthy_codebook_skips_the_anchor_search(monkeypatch):
    """cvq: when every code is in use (alpha ~ e^-1000), no anchors are drawn and no code moves."""
    q = make("cvq")
    q.usage.fill_(1 / K)
    before = q.embedding.detach().clone()
    monkeypatch.setattr(q, "_anchors", lambda *a: pytest.fail("anchors drawn for codes that cannot move"))
    q(torch.randn(64, D))
    assert torch.equal(q.embedding, before)


def test_cvq_leaves_codes_alone_in_eval_and_searches_by_cosine():
    """cvq: eval changes nothing; with cosine distance the code is the one of largest cosine."""
    q = make("cvq").eval()
    before = q.embedding.detach().clone()
    z = torch.randn(40, D)
    idx = q(z).indices
    assert torch.equal(q.embedding, before)
    cos = F.normalize(z, dim=1) @ F.normalize(before, dim=1).t()
    assert torch.equal(idx, cos.argmax(1))


def test_cvq_step_still_trains_the_used_codes():
    """cvq: the in-place pull after z_q is taken does not break the backward pass."""
    q = make("cvq")
    out = q(torch.randn(16, D, requires_grad=True))
    out.losses["codebook"].backward()
    assert q.embedding.grad[out.indices.unique()].abs().sum() > 0


# -- ibq -------------------------------------------------------------------------------------
def test_ibq_every_code_receives_gradient_in_one_step():
    """ibq: the decoder's gradient alone reaches all K codes (vq's reaches only the selected)."""
    z = torch.randn(16, D)
    for name, all_codes in (("ibq", True), ("vq", False)):
        q = make(name)
        out = q(z)
        out.z_q.square().sum().backward()
        grad = q.embedding.grad if q.embedding.grad is not None else torch.zeros(K, D)
        touched = grad.abs().sum(1) > 0
        assert out.indices.unique().numel() < K
        assert touched.all().item() is all_codes, name


MODES = [(keep, sparse) for keep in (True, False) for sparse in (True, False)]
MODE_IDS = [f"{'kept' if k else 'recomputed'}-{'sparse' if s else 'dense'}" for k, s in MODES]


@pytest.mark.parametrize("keep, sparse", MODES, ids=MODE_IDS)
def test_ibq_blocked_soft_assignment_has_exact_gradients(keep, sparse):
    """ibq: the row-blocked SoftAssignment passes torch's finite-difference gradcheck in each
    of its modes (exps kept or recomputed; entropy terms on the hot entries or dense) (soft
    codes with respect to z only: their C is stop-gradient by design, its gradient arrives
    through the scores, checked against the dense reference below)."""
    from vqstudy.quantizers.ibq import SoftAssignment

    torch.manual_seed(0)
    z = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    c = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    for t in (0.5, 0.002):    # 0.002: most entries below exp's underflow at t, sparse blocks
        def apply(z, c):
            return SoftAssignment.apply(z, c, t, 3, keep, sparse, z.new_empty(z.shape[0] * c.shape[0]))

        assert torch.autograd.gradcheck(lambda z: apply(z, c.detach())[1:], (z,))
        assert torch.autograd.gradcheck(lambda c: apply(z.detach(), c)[2:], (c,))


@pytest.mark.parametrize("temperature", [0.01, 1.0], ids=["hot-entries", "dense-blocks"])
def test_ibq_soft_assignment_modes_agree(temperature):
    """ibq: every mode gives the dense, recomputing mode's values and gradients (float32,
    several blocks; at t = 1 the sparse mode falls back to dense blocks)."""
    from vqstudy.quantizers.ibq import SoftAssignment

    torch.manual_seed(0)
    z, c = torch.randn(100, D), torch.randn(K, D)
    weights = [torch.randn(100, D), torch.randn(()), torch.randn(K)]
    results = []
    for keep, sparse in MODES:
        zi, ci = z.clone().requires_grad_(True), c.clone().requires_grad_(True)
        idx, *outs = SoftAssignment.apply(zi, ci, temperature, 16, keep, sparse, torch.empty(100 * K))
        sum((o * w).sum() for o, w in zip(outs, weights)).backward()
        results.append((idx, *outs, zi.grad, ci.grad))
    for other in results[:-1]:
        assert torch.equal(other[0], results[-1][0])
        assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(other[1:], results[-1][1:]))


def test_ibq_reused_workspace_never_gives_stale_gradients():
    """ibq: the score buffer is reused from step to step; a second forward pass before the
    first one's backward makes that backward raise instead of using overwritten scores."""
    q = make("ibq")
    first = q(torch.randn(32, D, requires_grad=True))
    q(torch.randn(32, D, requires_grad=True))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        sum(first.losses.values()).backward()


def test_ibq_equals_the_reference_formulation():
    """ibq: losses and gradients equal the reference's dense one-hot version (SEED-Voken's
    IndexPropagationQuantize with MAGVIT-v2's entropy loss), written out here."""
    torch.manual_seed(0)
    q = make("ibq", beta=1.0, codebook_weight=0.25)
    z = torch.randn(40, D, requires_grad=True)
    out = q(z)
    (out.z_q.sin().sum() + sum(out.losses.values())).backward()
    ours = z.grad.clone(), q.embedding.grad.clone()

    z.grad, c = None, q.embedding.detach().clone().requires_grad_(True)
    logits = z @ c.t()                                                       # (N, K)
    soft = logits.softmax(1)
    hard = torch.zeros_like(logits).scatter_(1, logits.argmax(1, keepdim=True), 1.0)
    z_q, z_q2 = (hard - soft.detach() + soft) @ c, hard @ c
    p = (logits / 0.01).softmax(1)
    avg = p.mean(0)
    reference = (F.mse_loss(z_q, z) + F.mse_loss(z_q2.detach(), z) + 0.25 * F.mse_loss(z_q2, z.detach())
                 + 0.1 * (-(p * (logits / 0.01).log_softmax(1)).sum(1).mean())
                 - 0.1 * (-(avg * avg.clamp_min(1e-30).log()).sum()))
    assert torch.allclose(sum(out.losses.values()), reference, atol=1e-5)
    (z_q.sin().sum() + reference).backward()
    assert torch.allclose(ours[0], z.grad, atol=1e-5) and torch.allclose(ours[1], c.grad, atol=1e-5)


def test_ibq_picks_the_largest_logit_in_train_and_eval():
    """ibq: the code is argmax_k z.c_k (not the L2-nearest), the same in training and eval."""
    q = make("ibq")
    z = torch.randn(64, D)
    expected = (z @ q.embedding.detach().t()).argmax(1)
    assert torch.equal(q(z).indices, expected)
    with torch.no_grad():
        assert torch.equal(q.eval()(z).indices, expected)


def test_ibq_losses_and_their_weights():
    """ibq: the reference's terms, VQ pair weighted by beta / codebook_weight, entropies signed."""
    torch.manual_seed(1)
    z = torch.randn(32, D)
    a = make("ibq")(z).losses
    b = make("ibq", beta=1.0, codebook_weight=0.25, sample_entropy_weight=0.2, batch_entropy_weight=0.0)(z).losses
    assert set(a) == {"index_backprop", "commitment", "codebook", "sample_entropy", "batch_entropy"}
    assert torch.allclose(a["index_backprop"], a["codebook"])       # same value ||q - z||^2, other gradient
    assert torch.allclose(b["commitment"], 4 * a["commitment"]) and torch.allclose(b["codebook"], 0.25 * a["codebook"])
    assert torch.allclose(b["sample_entropy"], 2 * a["sample_entropy"]) and b["batch_entropy"] == 0
    assert a["batch_entropy"] < 0 < a["sample_entropy"]


# -- fsq and lfq against vector-quantize-pytorch ------------------------------------------
def _copy_projections(ours, theirs) -> None:
    ours.project_in.load_state_dict(theirs.project_in.state_dict())
    ours.project_out.load_state_dict(theirs.project_out.state_dict())


@pytest.mark.parametrize("dim", [4, 16], ids=["no-projection", "projected"])
@pytest.mark.parametrize("levels", [(8, 5, 5, 5), (7, 5, 5, 5, 5), (4, 4, 4, 4)])
def test_fsq_matches_reference(levels, dim):
    """fsq: same input and levels (and projections) -> the reference's codes and indices."""
    from vector_quantize_pytorch import FSQ

    if dim < len(levels) or (dim == 4 and len(levels) != 4):
        dim = len(levels)
    torch.manual_seed(0)
    theirs = FSQ(levels=list(levels), dim=dim)
    ours = build_quantizer("fsq", dim=dim, codebook_size=math.prod(levels), levels=levels)
    if dim != len(levels):
        _copy_projections(ours, theirs)
    z = 3 * torch.randn(2, 300, dim)
    with torch.no_grad():
        ref_q, ref_idx = theirs(z)
        out = ours(z)
    assert torch.equal(out.indices, ref_idx.long())
    assert torch.allclose(out.z_q, ref_q, atol=1e-6)
    if dim == len(levels):
        assert torch.allclose(ours.codebook, theirs.implicit_codebook)


@pytest.mark.parametrize("k, levels", [(256, (8, 6, 5)), (1024, (8, 5, 5, 5)), (4096, (7, 5, 5, 5, 5)),
                                       (16384, (8, 8, 8, 6, 5)), (65536, (8, 8, 8, 5, 5, 5))])
def test_fsq_codebook_size_maps_to_the_papers_levels(k, levels):
    """fsq: codebook_size 2^8..2^16 gives the FSQ paper's levels (Table 1), every code reachable."""
    q = build_quantizer("fsq", dim=len(levels), codebook_size=k)
    assert tuple(q.levels.tolist()) == levels and q.num_codes == math.prod(levels)
    every = torch.arange(q.num_codes)
    level = q.codes_of(every) * q.half_width                        # (K, d) integer level of each code
    half_l = (q.levels - 1) * (1 + 1e-3) / 2                        # invert FSQ.bound at each level
    offset = (q.levels % 2 == 0) * 0.5
    z = torch.atanh((level + offset) / half_l) - torch.atanh(offset / half_l)
    with torch.no_grad():
        assert torch.equal(q(z).indices, every)


@pytest.mark.parametrize("dim, bits", [(6, 6), (16, 6), (8, 10)], ids=["no-projection", "projected", "bits>dim"])
def test_lfq_matches_reference(dim, bits):
    """lfq: same input and projections -> the reference's codes and indices (bit order MSB first)."""
    from vector_quantize_pytorch import LFQ

    torch.manual_seed(0)
    theirs = LFQ(dim=dim, codebook_size=2**bits).eval()
    ours = build_quantizer("lfq", dim=dim, codebook_size=2**bits).eval()
    if dim != bits:
        _copy_projections(ours, theirs)
    z = torch.randn(2, 300, dim)
    with torch.no_grad():
        ref = theirs(z)
        out = ours(z)
    assert torch.equal(out.indices, ref.indices.long())
    assert torch.allclose(out.z_q, ref.quantized, atol=1e-6)
    if dim == bits:
        assert torch.equal(ours.codebook, theirs.codebook)


def test_lfq_entropies_match_the_reference_full_softmax():
    """lfq: per-sample and joint batch entropy equal the reference's softmax over all 2^d codes;
    the factorized batch term bounds it from above, and equals it on a full grid of signs."""
    from vector_quantize_pytorch import LFQ

    bits = 6
    theirs = LFQ(dim=bits, codebook_size=2**bits).train()
    weights = {"sample_entropy_weight": 1.0, "batch_entropy_weight": 1.0}
    joint = build_quantizer("lfq", dim=bits, codebook_size=2**bits, **weights).train()
    factorized = build_quantizer("lfq", dim=bits, codebook_size=2**bits, batch_entropy="factorized", **weights).train()
    signs = torch.tensor([[1.0 if (i >> b) & 1 else -1.0 for b in range(bits)] for i in range(2**bits)])
    torch.manual_seed(0)
    correlated = 0.05 * torch.randn(1, 512, 1).repeat(1, 1, bits)           # all bits copy one another
    for case, z in (("random", 0.004 * torch.randn(1, 512, bits)), ("correlated", correlated),
                    ("grid", 0.004 * signs[None])):
        _, parts = theirs(z, return_loss_breakdown=True)
        reference = parts.batch_entropy.item()
        ours, bound = joint(z).losses, -factorized(z).losses["batch_entropy"].item()
        assert ours["sample_entropy"].item() == pytest.approx(parts.per_sample_entropy.item(), rel=1e-3, abs=1e-4)
        assert -ours["batch_entropy"].item() == pytest.approx(reference, rel=1e-3)
        assert bound >= reference - 1e-4
        if case == "grid":
            assert bound == pytest.approx(reference, rel=1e-3)
        if case == "correlated":                                            # 6 bits that are one bit
            assert bound > 3 * reference


def test_lfq_blocked_code_marginal_has_exact_gradients():
    """lfq: CodeMarginal (blocks of 3 codes) passes torch's finite-difference gradcheck."""
    from vqstudy.quantizers.lfq import CodeMarginal

    torch.manual_seed(0)
    logit = torch.randn(5, 3, dtype=torch.float64)
    log_plus = torch.nn.functional.logsigmoid(logit).requires_grad_(True)
    log_minus = torch.nn.functional.logsigmoid(-logit).requires_grad_(True)
    bit_values = 2 ** torch.arange(2, -1, -1)
    assert torch.autograd.gradcheck(lambda a, b: CodeMarginal.apply(a, b, bit_values, 3), (log_plus, log_minus))


@pytest.mark.parametrize("name, dim, k", [("fsq", 3, 240), ("lfq", 18, 2**18), ("lfq", 64, 2**18)])
def test_implicit_codebook_metrics_never_list_codes(name, dim, k, monkeypatch):
    """fsq/lfq: codebook_covariance comes in closed form, without materializing the K codes."""
    q = build_quantizer(name, dim=dim, codebook_size=k, **({"levels": (8, 6, 5)} if name == "fsq" else {}))
    monkeypatch.setattr(type(q), "codebook", property(lambda self: pytest.fail("codebook was materialized")))
    cov = codebook_covariance(q)
    assert cov.shape == (dim, dim) and torch.isfinite(cov).all()
