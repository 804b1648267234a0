import torch

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
