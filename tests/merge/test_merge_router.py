import pytest
import torch

from moecompress.core import held as core_held
from moecompress.merge import router
from moecompress.merge.router import cluster_logits, fit_router_rows, merged_router_rows


def _setup(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 16, generator=g, dtype=torch.float64)
    w = torch.randn(8, 16, generator=g, dtype=torch.float64)
    return x, w


def _topk(x, w, k=2):
    return (x @ w.T).topk(k, dim=1).indices


def test_all_singleton_rebuild_keeps_routing():
    x, w = _setup()
    clusters = [[e] for e in range(8)]
    rows, bias = merged_router_rows(w, clusters, torch.rand(8))
    assert bias is None and torch.equal(rows, w)
    fit, _ = fit_router_rows(x, w, clusters, kl_steps=5)
    assert torch.equal(fit, w)
    assert torch.equal(_topk(x, fit), _topk(x, w))


def test_singleton_rows_unchanged_when_others_merge():
    x, w = _setup(1)
    clusters = [[0, 3], [1], [2, 5, 6], [4], [7]]
    freqs = torch.tensor([0.2, 0.1, 0.1, 0.1, 0.2, 0.1, 0.1, 0.1])
    rows, _ = merged_router_rows(w, clusters, freqs)
    for c, m in enumerate(clusters):
        if len(m) == 1:
            assert torch.equal(rows[c], w[m[0]])
    expected = (freqs[[0, 3], None].double() * w[[0, 3]]).sum(0) / freqs[[0, 3]].sum()
    assert torch.allclose(rows[0], expected)
    fit, _ = fit_router_rows(x, w, clusters)
    for c, m in enumerate(clusters):
        if len(m) == 1:
            assert torch.equal(fit[c], w[m[0]])


def test_fit_matches_combined_routing_better_than_average():
    x, w = _setup(2)
    clusters = [[0, 1], [2, 3], [4], [5], [6, 7]]
    target = cluster_logits(x @ w.T, clusters).softmax(1)  # [T, K]

    def kl(rows):
        logq = (x @ rows.T).log_softmax(1)
        return float((target * (target.log() - logq)).sum(1).mean())

    avg, _ = merged_router_rows(w, clusters, torch.ones(8))
    fit, _ = fit_router_rows(x, w, clusters, ridge=1e-4)
    refined, _ = fit_router_rows(x, w, clusters, ridge=1e-4, kl_steps=50)
    assert kl(fit) < kl(avg)
    assert kl(refined) <= kl(fit) + 1e-9


def test_bias_is_carried():
    x, w = _setup(3)
    b = torch.randn(8, dtype=torch.float64)
    clusters = [[0, 1, 2], [3], [4, 5], [6, 7]]
    rows, nb = fit_router_rows(x, w, clusters, bias=b)
    assert rows.shape == (4, 16) and nb.shape == (4,)
    assert nb[1] == b[3] and torch.equal(rows[1], w[3])
    _, ab = merged_router_rows(w, clusters, torch.ones(8), bias=b)
    assert torch.allclose(ab[0], b[:3].mean())


def _fit_unblocked(x, w, clusters, bias=None, ridge=1e-2):
    """RouterFitter.fit as it was computed before its blocks: the whole float64 design matrix and cholesky_solve."""
    xa = x.double() if bias is None else torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
    W = w.double()
    logits = x.double() @ W.T + (bias.double() if bias is not None else 0.0)
    gram = xa.T @ xa
    lam = max(ridge * float(gram.diagonal().mean()), 1e-12)
    gram.diagonal().add_(lam)
    prior = torch.stack([W[m].mean(0) for m in clusters])
    if bias is not None:
        prior = torch.cat([prior, torch.stack([bias.double()[m].mean() for m in clusters])[:, None]], 1)
    rhs = xa.T @ cluster_logits(logits, clusters) + lam * prior.T
    return torch.cholesky_solve(rhs, torch.linalg.cholesky(gram)).T


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("block_bytes", [8 * 300 * 5, 1 << 25])  # blocks of 5 columns, or all at once
@pytest.mark.parametrize("held_bytes", [0, 1 << 27])  # the factor in a file, or in memory
def test_fit_blocks_bit_for_bit(monkeypatch, with_bias, block_bytes, held_bytes):
    """The fit's x^T target in column blocks and its two triangular solves give cholesky_solve's rows bit for bit."""
    monkeypatch.setattr(router, "XT_BLOCK_BYTES", block_bytes)
    monkeypatch.setattr(core_held, "HELD_BYTES", held_bytes)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(300, 37, generator=g)  # float32 tokens, as LayerFit passes them
    w = torch.randn(8, 37, generator=g).to(torch.bfloat16)
    b = torch.randn(8, generator=g) if with_bias else None
    f = router.RouterFitter(x, w, b, dtypes=(torch.float64, None if b is None else torch.float64))
    assert f.chol.spilled == (held_bytes == 0)
    for clusters in ([[0, 3]], [[0, 1, 2], [3], [4, 5], [6, 7]]):
        rows, nb = f.fit(clusters)
        sol = _fit_unblocked(x, w, clusters, b)
        for c, m in enumerate(clusters):  # singletons keep their row (and bias) as they are
            if len(m) > 1:
                assert torch.equal(rows[c], sol[c, :37])
                assert b is None or torch.equal(nb[c], sol[c, 37])
