"""Per-layer expert clustering for merging (pure tensor functions).

- ``kmeans_cluster``: seeded k-means with k-means++ initialisation (Sub-MoE), best of ``n_init`` restarts.
- ``agglomerative_cluster``: average-linkage hierarchical clustering on a distance matrix (HC-SMoE baseline).

Both return exactly ``n_clusters`` non-empty clusters as labels [E], canonically numbered by each cluster's
smallest member, and keep every protected expert (super / shared experts) alone in its own cluster.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def n_clusters_for(n_experts: int, ratio: float) -> int:
    """Experts left after merging away ``round(ratio * E)`` of them (the pruning rule of DESIGN section 5)."""
    return n_experts - int(round(ratio * n_experts))


class MergeTargetError(ValueError):
    """A merge target the layer cannot take; ``fix`` says which way to change the ratio: "larger", "smaller",
    "unprotect" (smaller, or protect fewer experts) or "other" (the run layer words it with its flags)."""

    def __init__(self, message: str, fix: str):
        super().__init__(message)
        self.fix = fix


def check_merge_target(n_experts: int, n_clusters: int, top_k: int, n_protected: int = 0, n_group: int = 1) -> None:
    """Refuse a merge target the model cannot run or the protected experts do not leave room for.

    Raises:
        MergeTargetError: fewer experts than top-k, no expert merged, protected experts taking every cluster, or an
            expert count that breaks ``E % n_group == 0`` (grouped routing).
    """
    if n_clusters >= n_experts:
        raise MergeTargetError(f"merging to {n_clusters} of {n_experts} experts merges none", "larger")
    if n_clusters < top_k:
        raise MergeTargetError(
            f"merging to {n_clusters} experts leaves fewer than top-k={top_k} experts per layer", "smaller"
        )
    if n_protected >= n_clusters and n_protected < n_experts:
        raise MergeTargetError(
            f"{n_protected} protected experts need {n_protected} of the {n_clusters} merged experts, leaving none for "
            "the others",
            "unprotect",
        )
    if n_group > 1 and n_clusters % n_group:
        raise MergeTargetError(f"{n_clusters} experts is not a multiple of n_group={n_group}", "other")


def labels_to_clusters(labels: torch.Tensor) -> list[list[int]]:
    """Members of each cluster, ordered by cluster id: labels [E] -> [[old expert ids], ...]."""
    k = int(labels.max()) + 1 if labels.numel() else 0
    return [sorted(int(e) for e in (labels == c).nonzero().flatten()) for c in range(k)]


def _canonical(groups: list[list[int]], n_experts: int) -> torch.Tensor:
    """Labels [E] with clusters numbered by their smallest member (stable, order-independent)."""
    labels = torch.empty(n_experts, dtype=torch.long)
    for new_id, members in enumerate(sorted(groups, key=min)):
        labels[members] = new_id
    return labels


def _split_protected(n_experts: int, n_clusters: int, protected: Iterable[int]) -> tuple[list[int], list[int], int]:
    prot = sorted({int(p) for p in protected})
    if not 1 <= n_clusters <= n_experts:
        raise ValueError(f"n_clusters must be in [1, {n_experts}], got {n_clusters}")
    if any(not 0 <= p < n_experts for p in prot):
        raise ValueError(f"protected expert ids must be in [0, {n_experts}), got {prot}")
    free = [e for e in range(n_experts) if e not in set(prot)]
    k_free = n_clusters - len(prot)
    if k_free < 0 or (free and k_free == 0):
        raise ValueError(
            f"{len(prot)} protected experts need their own clusters: {n_clusters} clusters leave none for the "
            f"{len(free)} other experts"
        )
    return prot, free, k_free


def _kmeans_once(x: torch.Tensor, k: int, gen: torch.Generator, n_iter: int) -> tuple[torch.Tensor, float]:
    """One k-means run on x [N, D] with k-means++ init; returns labels [N] (no empty cluster) and inertia."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    centers = [x[first]]
    d2 = ((x - x[first]) ** 2).sum(1)  # [N]
    for _ in range(1, k):
        total = float(d2.sum())
        if total <= 0:  # all remaining points coincide with a centre: take any not yet chosen
            idx = int(torch.randint(n, (1,), generator=gen))
        else:
            idx = int(torch.multinomial(d2 / total, 1, generator=gen))
        centers.append(x[idx])
        d2 = torch.minimum(d2, ((x - x[idx]) ** 2).sum(1))
    c = torch.stack(centers)  # [k, D]
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(n_iter):
        dist = torch.cdist(x, c) ** 2  # [N, k]
        new = dist.argmin(1)  # [N]
        # Refill empty clusters with the point farthest from its centre among clusters of size > 1.
        for j in range(k):
            if (new == j).any():
                continue
            counts = torch.bincount(new, minlength=k)
            own = dist.gather(1, new[:, None]).squeeze(1).clone()  # [N]
            own[counts[new] <= 1] = -1.0
            new[int(own.argmax())] = j
        if torch.equal(new, labels):
            break
        labels = new
        c = torch.stack([x[labels == j].mean(0) for j in range(k)])
    inertia = float(((x - c[labels]) ** 2).sum())
    return labels, inertia


def kmeans_cluster(
    features: torch.Tensor,
    n_clusters: int,
    protected: Iterable[int] = (),
    seed: int = 0,
    n_init: int = 8,
    n_iter: int = 100,
) -> torch.Tensor:
    """Seeded k-means (k-means++ init) of experts into exactly ``n_clusters`` clusters.

    Args:
        features: [E, D] one feature vector per expert (e.g. ``similarity.output_features``).
        n_clusters: number of clusters (= experts after merging), protected singletons included.
        protected: expert ids that are never merged with another expert.
        seed: RNG seed; the same inputs and seed give the same labels.
        n_init: k-means++ restarts; the lowest inertia wins.
        n_iter: Lloyd iterations per restart.

    Returns:
        labels [E] (long) in [0, n_clusters), every cluster non-empty, numbered by smallest member.
    """
    E = features.shape[0]
    prot, free, k_free = _split_protected(E, n_clusters, protected)
    groups = [[p] for p in prot]
    if k_free >= len(free):
        groups += [[e] for e in free]
    elif free:
        x = features[free].to(torch.float64)  # [N, D]
        gen = torch.Generator().manual_seed(int(seed))
        best, best_inertia = None, float("inf")
        for _ in range(max(1, n_init)):
            labels, inertia = _kmeans_once(x, k_free, gen, n_iter)
            if inertia < best_inertia - 1e-12:
                best, best_inertia = labels, inertia
        assert best is not None
        groups += [[free[i] for i in (best == j).nonzero().flatten().tolist()] for j in range(k_free)]
    return _canonical(groups, E)


def agglomerative_cluster(distance: torch.Tensor, n_clusters: int, protected: Iterable[int] = ()) -> torch.Tensor:
    """Average-linkage agglomerative clustering into exactly ``n_clusters`` clusters.

    Args:
        distance: [E, E] symmetric pairwise distances (e.g. 1 - cosine of mean expert outputs).
        n_clusters: number of clusters, protected singletons included.
        protected: expert ids that are never merged with another expert.

    Returns:
        labels [E] (long) in [0, n_clusters), numbered by smallest member. Ties break to the lowest ids.
    """
    E = distance.shape[0]
    prot, free, k_free = _split_protected(E, n_clusters, protected)
    groups: list[list[int]] = [[e] for e in free]
    link = distance.to(torch.float64)[free][:, free].clone()  # [G, G] average linkage between groups
    link.fill_diagonal_(float("inf"))
    while len(groups) > max(k_free, 1):
        a, b = divmod(int(link.argmin()), len(groups))  # first minimum in row-major order: lowest ids win
        a, b = min(a, b), max(a, b)
        na, nb = len(groups[a]), len(groups[b])
        row = (na * link[a] + nb * link[b]) / (na + nb)  # Lance-Williams update for average linkage
        link[a], link[:, a] = row, row
        link[a, a] = float("inf")
        keep = [i for i in range(len(groups)) if i != b]
        link = link[keep][:, keep]
        groups[a] = groups[a] + groups[b]
        del groups[b]
    return _canonical([[p] for p in prot] + groups, E)
