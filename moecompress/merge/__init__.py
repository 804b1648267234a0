"""Expert merging: similarity, clustering, subspace merge and router rebuild (pure tensor functions); the layer
merge (layer.py), its engine transform (transform.py) and the command (run.py)."""

from moecompress.merge.cluster import agglomerative_cluster, kmeans_cluster, labels_to_clusters
from moecompress.merge.router import fit_router_rows, merged_router_rows
from moecompress.merge.similarity import (
    gram_features,
    output_features,
    outputs_by_expert,
    pairwise_output_similarity,
    router_logit_similarity,
)
from moecompress.merge.subspace import merge_average, merge_subspace, rank_for

__all__ = [
    "agglomerative_cluster",
    "fit_router_rows",
    "gram_features",
    "kmeans_cluster",
    "labels_to_clusters",
    "merge_average",
    "merge_subspace",
    "merged_router_rows",
    "output_features",
    "outputs_by_expert",
    "pairwise_output_similarity",
    "rank_for",
    "router_logit_similarity",
]
