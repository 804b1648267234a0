"""HEAPr scores, gradient sketches, channel selection and slicing (pure tensor functions)."""

import pytest
import torch
import torch.nn.functional as F

from moecompress.atomic.apply import pad_exact, padded_width, slice_exact, slice_uniform
from moecompress.atomic.gradstats import GradStatAccumulator, bytes_per_expert
from moecompress.atomic.heapr import (
    LowRankG,
    heapr_scores,
    quadratic_form,
    ranking_agreement,
    select_exact,
    spearman,
    top_channels,
    uniform_width,
)
from moecompress.core.families import MoEWeights


def _expert(x, Wg, Wu, Wd):
    """Unweighted SwiGLU expert: x [T, H] -> h [T, I], f [T, H]."""
    h = F.silu(x @ Wg.T) * (x @ Wu.T)
    return h, h @ Wd.T


def test_quadratic_form_matches_loops_for_every_kind():
    torch.manual_seed(0)
    E, H, I = 3, 6, 5
    W = torch.randn(E, H, I)
    A = torch.randn(E, 20, H)
    G = A.transpose(1, 2) @ A / 20  # [E, H, H]
    q = quadratic_form(W, G)
    for e in range(E):
        for j in range(I):
            w = W[e, :, j].double()
            assert q[e, j].item() == pytest.approx((w @ G[e].double() @ w).item(), rel=1e-10)
    d = torch.diagonal(G, dim1=1, dim2=2)
    assert torch.allclose(quadratic_form(W, d), quadratic_form(W, torch.diag_embed(d)), rtol=1e-10)
    U = torch.randn(E, H, 2)
    r = torch.rand(E, H)
    low = quadratic_form(W, LowRankG(U, r))
    assert torch.allclose(low, quadratic_form(W, U @ U.transpose(1, 2) + torch.diag_embed(r)), rtol=1e-5)


def test_score_equals_second_order_taylor_term_of_the_loss():
    """One token, loss = CE(A y + b, label). The Fisher over labels is the exact Hessian of the loss in the expert
    output, so m * w^T G w must equal the brute-force quadratic form d^T Hess d with d = h_j w_j (autograd Hessian),
    and the expected loss change (KL) of zeroing a channel must be ~ score / 2."""
    torch.manual_seed(1)
    H, I, V = 8, 12, 10
    x = torch.randn(1, H, dtype=torch.float64)
    Wg, Wu = torch.randn(I, H, dtype=torch.float64) * 0.3, torch.randn(I, H, dtype=torch.float64) * 0.3
    Wd = torch.randn(H, I, dtype=torch.float64) * 0.1
    A, b = torch.randn(V, H, dtype=torch.float64), torch.randn(V, dtype=torch.float64)
    p = 0.7  # routing weight
    h, f = _expert(x, Wg, Wu, Wd)
    logits = (p * f) @ A.T + b
    pi = logits.softmax(-1)[0]  # [V]
    # Fisher G = E_{label~pi} g g^T with g = dCE/df = p * A^T (pi - onehot)
    G = torch.zeros(H, H, dtype=torch.float64)
    for y in range(V):
        g = p * A.T @ (pi - F.one_hot(torch.tensor(y), V).double())
        G += pi[y] * torch.outer(g, g)
    s = heapr_scores(h.square(), Wd[None], G[None])[0]  # [I]

    def expected_ce(fv):  # E_{label~pi0}[CE] as a function of the expert output f
        return -(pi.detach() * ((p * fv) @ A.T + b).log_softmax(-1)).sum()

    Hess = torch.autograd.functional.hessian(expected_ce, f[0])  # [H, H]
    kl = []
    for j in range(I):
        d = h[0, j] * Wd[:, j]
        assert s[j].item() == pytest.approx((d @ Hess @ d).item(), rel=1e-8)
        kl.append((expected_ce(f[0] - d) - expected_ce(f[0])).item())
    kl = torch.tensor(kl, dtype=torch.float64)
    assert torch.allclose(kl, s / 2, rtol=0.05, atol=1e-6)
    assert spearman(kl, s) > 0.95


def test_update_routed_scales_by_routing_weight_and_full_diag_agree():
    torch.manual_seed(2)
    T, H, E, k = 40, 5, 4, 2
    grad = torch.randn(T, H)
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(T)])  # [T, k]
    w = torch.rand(T, k)
    full, diag = GradStatAccumulator(E, H, "full"), GradStatAccumulator(E, H, "diag")
    for acc in (full, diag):
        acc.update_routed(grad, idx, w)
    G = full.result()
    for e in range(E):
        rows = [grad[t] * w[t, s] for t in range(T) for s in range(k) if idx[t, s] == e]
        ref = sum(torch.outer(r, r) for r in rows) / len(rows)
        assert full.counts[e].item() == len(rows)
        assert torch.allclose(G[e], ref, atol=1e-6)
        assert torch.allclose(diag.result()[e], torch.diagonal(ref), atol=1e-6)


def test_lowrank_sketch_is_exact_on_low_rank_data_and_bounded_otherwise():
    torch.manual_seed(3)
    H, r = 16, 4
    basis = torch.randn(3, H)
    g = torch.randn(200, 3) @ basis  # rank 3 <= r
    acc = GradStatAccumulator(1, H, "lowrank", rank=r)
    for chunk in g.split(7):
        acc.update(0, chunk)
    low = acc.result()
    G = (g.T @ g / 200)[None].double()
    approx = low.factors.double() @ low.factors.double().transpose(1, 2)
    assert torch.allclose(approx, G, atol=1e-4 * G.abs().max())
    # full-rank data: sketch under-estimates G (PSD gap) within the Frequent Directions bound; diagonal is exact
    g = torch.randn(300, H) * torch.linspace(3, 0.1, H)
    acc = GradStatAccumulator(1, H, "lowrank", rank=r)
    for chunk in g.split(11):
        acc.update(0, chunk)
    low = acc.result()
    Gs = (g.T @ g / 300).double()
    B = low.factors[0].double() @ low.factors[0].double().T
    gap = torch.linalg.eigvalsh(Gs - B)
    assert gap.min() > -1e-4
    assert gap.max() <= (g.double().square().sum() / 300) / (r + 1) + 1e-4
    assert torch.allclose(torch.diagonal(B) + low.residual_diag[0].double(), torch.diagonal(Gs), atol=1e-4)
    W = torch.randn(1, H, 32)
    agree = ranking_agreement([quadratic_form(W, Gs[None])], [quadratic_form(W, low)])
    assert agree["spearman_global"] > 0.8


def test_memory_per_expert():
    assert bytes_per_expert("full", 2048)["stored"] == 2048 * 2048 * 4
    assert bytes_per_expert("diag", 2048)["stored"] == 2048 * 4
    assert bytes_per_expert("lowrank", 2048, rank=32) == {"accumulating": 65 * 2048 * 4, "stored": 33 * 2048 * 4}


def test_select_exact_global_lowest_and_protection():
    torch.manual_seed(4)
    scores = [torch.rand(4, 8), torch.rand(3, 8) * 0.1]
    prot = [torch.tensor([True, False, False, False]), torch.zeros(3, dtype=torch.bool)]
    keep = select_exact(scores, 0.25, prot)
    n_removed = sum(int((~k).sum()) for k in keep)
    assert n_removed == round(0.25 * 56)
    assert keep[0][0].all()
    removed = torch.cat([s[~k] for s, k in zip(scores, keep, strict=True)])
    kept_unprot = torch.cat([scores[0][1:][keep[0][1:]], scores[1][keep[1]]])
    assert removed.max() <= kept_unprot.min()
    with pytest.raises(ValueError):
        select_exact([torch.rand(2, 4)], 0.75, [torch.tensor([True, False])])


def test_top_channels_and_width():
    assert uniform_width(128, 0.25) == 96
    assert uniform_width(768, 0.2) % 16 == 0
    assert uniform_width(128, 0.99) == 16
    s = torch.tensor([[0.1, 0.5, 0.3, 0.9], [4.0, 3.0, 2.0, 1.0]])
    assert top_channels(s, 2).tolist() == [[1, 3], [0, 1]]


def _weights(E=3, I=8, H=5):
    torch.manual_seed(5)
    return MoEWeights(
        gate=torch.randn(E, I, H), up=torch.randn(E, I, H), down=torch.randn(E, H, I), router=torch.randn(E, H)
    )


def test_slicing_equals_zeroing_channels():
    w = _weights()
    x = torch.randn(7, 5)
    keep = torch.tensor([[0, 2, 5], [1, 2, 7], [3, 4, 6]])
    sl = slice_uniform(w, keep)
    assert sl.gate.shape == (3, 3, 5) and sl.down.shape == (3, 5, 3)
    for e in range(3):
        mask = torch.zeros(8)
        mask[keep[e]] = 1
        h, _ = _expert(x, w.gate[e], w.up[e], w.down[e])
        ref = (h * mask) @ w.down[e].T
        assert torch.allclose(_expert(x, sl.gate[e], sl.up[e], sl.down[e])[1], ref, atol=1e-5)


def test_exact_slicing_drops_empty_experts_and_padding_is_exact():
    w = _weights()
    keep = [torch.tensor([0, 3]), torch.tensor([], dtype=torch.long), torch.tensor([1, 2, 4, 5, 7])]
    ex = slice_exact(w, keep)
    assert ex.kept_experts == [0, 2] and ex.widths == [2, 5]
    assert torch.equal(ex.router, w.router[[0, 2]])
    width = padded_width(ex.widths)
    assert width == 16
    padded = pad_exact(ex, width)
    x = torch.randn(6, 5)
    for new, old in enumerate(ex.kept_experts):
        mask = torch.zeros(8)
        mask[keep[old]] = 1
        h, _ = _expert(x, w.gate[old], w.up[old], w.down[old])
        ref = (h * mask) @ w.down[old].T
        assert torch.allclose(_expert(x, padded.gate[new], padded.up[new], padded.down[new])[1], ref, atol=1e-5)
