import pytest
import torch

from moecompress.merge.cluster import agglomerative_cluster, kmeans_cluster, labels_to_clusters


def _blobs(seed: int = 0) -> tuple[torch.Tensor, list[set[int]]]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, 6, generator=g) * 10
    assign = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3])
    x = centers[assign] + 0.01 * torch.randn(12, 6, generator=g)
    truth = [set((assign == c).nonzero().flatten().tolist()) for c in range(4)]
    return x, truth


def test_kmeans_is_seeded_and_deterministic():
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(1))
    a = kmeans_cluster(x, 6, seed=3)
    b = kmeans_cluster(x, 6, seed=3)
    assert torch.equal(a, b)
    assert sorted(set(a.tolist())) == list(range(6))


def test_kmeans_recovers_blobs_and_canonical_numbering():
    x, truth = _blobs()
    labels = kmeans_cluster(x, 4, seed=0)
    clusters = labels_to_clusters(labels)
    assert sorted(map(set, clusters), key=min) == sorted(truth, key=min)
    assert [min(c) for c in clusters] == sorted(min(c) for c in clusters)


@pytest.mark.parametrize("k", [3, 5, 8, 12])
def test_kmeans_target_count_and_protected(k):
    x = torch.randn(12, 3, generator=torch.Generator().manual_seed(k))
    protected = [0, 7]
    labels = kmeans_cluster(x, k, protected=protected, seed=0)
    clusters = labels_to_clusters(labels)
    assert len(clusters) == k and all(clusters)
    for p in protected:
        assert [p] in clusters


def test_kmeans_never_leaves_empty_cluster_with_duplicates():
    x = torch.zeros(10, 4)
    x[5:] = 1.0
    labels = kmeans_cluster(x, 5, seed=0)
    assert torch.bincount(labels, minlength=5).min() >= 1


def test_agglomerative_average_linkage():
    x, truth = _blobs(2)
    dist = torch.cdist(x, x)
    clusters = labels_to_clusters(agglomerative_cluster(dist, 4))
    assert sorted(map(set, clusters), key=min) == sorted(truth, key=min)
    labels = agglomerative_cluster(dist, 6, protected=[3])
    clusters = labels_to_clusters(labels)
    assert len(clusters) == 6 and [3] in clusters


def test_agglomerative_matches_scipy():
    scipy_h = pytest.importorskip("scipy.cluster.hierarchy")
    from scipy.spatial.distance import squareform

    x = torch.randn(14, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    dist = torch.cdist(x, x)
    ours = labels_to_clusters(agglomerative_cluster(dist, 5))
    z = scipy_h.linkage(squareform(dist.numpy(), checks=False), method="average")
    ref = scipy_h.fcluster(z, 5, criterion="maxclust")
    theirs = [sorted(i for i in range(14) if ref[i] == c) for c in set(ref.tolist())]
    assert sorted(ours) == sorted(theirs)


def test_protected_taking_all_clusters_is_refused():
    x = torch.randn(6, 2)
    with pytest.raises(ValueError, match="protected"):
        kmeans_cluster(x, 2, protected=[0, 1])
    with pytest.raises(ValueError):
        agglomerative_cluster(torch.cdist(x, x), 0)


def test_merge_target_is_checked_against_top_k():
    from moecompress.merge.cluster import MergeTargetError, check_merge_target, n_clusters_for

    assert n_clusters_for(16, 0.25) == 12 and n_clusters_for(16, 0.5) == 8 and n_clusters_for(60, 0.25) == 45
    check_merge_target(16, 8, top_k=2, n_protected=1)
    cases = [((16, 1, 2), {}, "top-k", "smaller"), ((16, 4, 2), {"n_protected": 4}, "protected", "unprotect")]
    cases += [((16, 6, 2), {"n_group": 4}, "n_group", "other"), ((16, 16, 2), {}, "merges none", "larger")]
    for args, kw, words, fix in cases:  # a ValueError saying which way to move the ratio, naming no CLI flag
        with pytest.raises(MergeTargetError, match=words) as err:
            check_merge_target(*args, **kw)
        assert isinstance(err.value, ValueError) and err.value.fix == fix and "--" not in str(err.value)
