"""Sub-MoE subspace merge of a cluster of expert weight matrices (pure tensor functions).

For member matrices W_1..W_n of shape [out, in] (one projection: gate, up or down):

    [W_1 ... W_n] = U S [V_1; ...; V_n]^T          (one SVD, shared U; V_i are column blocks of V^T)
    V_bar = sum_i f_i V_i / sum_i f_i              (frequency-weighted average of the blocks)
    W     = U_r S_r V_bar_r^T                      (rank r)

Untruncated (r = min(out, n * in)) this equals sum_i f_i W_i / sum_i f_i exactly, so the gain over plain
averaging comes from the truncation to the shared dominant subspace (and from the clustering); an untruncated
merge is therefore computed as that average, without the SVD.
"""

from __future__ import annotations

import math

import torch

# ``merge_average`` converts this many bytes of member rows to float64 at a time
AVERAGE_BLOCK_BYTES = 1 << 25


def _normalized_weights(freqs: torch.Tensor) -> torch.Tensor:
    """Frequency weights that sum to one; uniform when the cluster was never routed (all zero)."""
    f = freqs.to(torch.float64).clamp_min(0)  # [n]
    if float(f.sum()) <= 0.0:
        return torch.full_like(f, 1.0 / f.numel())
    return f / f.sum()


def merge_average(weights: torch.Tensor, freqs: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Frequency-weighted average of member matrices (HC-SMoE style merge).

    Args:
        weights: [n, out, in] member matrices.
        freqs: [n] non-negative routing frequencies (all zero -> uniform).

    Returns:
        [out, in] merged matrix in ``dtype`` (default: the dtype of ``weights``), rounded once from float64.
    """
    f = _normalized_weights(freqs).to(weights.device)  # [n]
    n, out_dim, in_dim = weights.shape
    merged = torch.empty(out_dim, in_dim, dtype=dtype or weights.dtype, device=weights.device)  # [out, in]
    # ``AVERAGE_BLOCK_BYTES`` of float64 member rows at a time, not [n, out, in] float64 (n x 117 MB at DeepSeek-V3
    # dims); each row's average is the same product, bit for bit (tests/merge/test_merge_subspace)
    step = max(1, AVERAGE_BLOCK_BYTES // (8 * n * max(1, in_dim)))
    for r0 in range(0, out_dim, step):
        merged[r0 : r0 + step] = torch.einsum("n,noi->oi", f, weights[:, r0 : r0 + step].to(torch.float64))
    return merged


def rank_for(out_dim: int, in_dim: int, n_members: int, rank: int | None, rank_fraction: float | None) -> int:
    """The SVD rank to keep for a merge of ``n_members`` [out_dim, in_dim] matrices.

    ``rank`` wins over ``rank_fraction`` (a fraction of the full rank min(out, n * in)); neither means full rank.
    """
    full = min(out_dim, n_members * in_dim)
    if rank is not None:
        return max(1, min(int(rank), full))
    if rank_fraction is not None:
        return max(1, min(full, math.ceil(rank_fraction * full)))
    return full


def merge_subspace(
    weights: torch.Tensor, freqs: torch.Tensor, rank: int | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Merge member matrices in their shared SVD subspace (Sub-MoE).

    Args:
        weights: [n, out, in] member matrices (one projection of each expert in the cluster).
        freqs: [n] non-negative routing frequencies of the members (all zero -> uniform).
        rank: number of singular directions kept; None keeps all (then the result is the weighted average).
        dtype: the result's dtype (default: the dtype of ``weights``).

    Returns:
        [out, in] merged matrix in ``dtype``, rounded once from float64.
    """
    n, out_dim, in_dim = weights.shape
    if n == 1 and rank is None:
        return weights[0].to(dtype or weights.dtype, copy=True)
    if rank is None or rank >= min(out_dim, n * in_dim):  # untruncated: exactly the weighted average
        return merge_average(weights, freqs, dtype)
    f = _normalized_weights(freqs).to(weights.device)  # [n]
    w = weights.to(torch.float64)
    cat = w.permute(1, 0, 2).reshape(out_dim, n * in_dim)  # [out, n*in]  = [W_1 ... W_n]
    U, S, Vh = torch.linalg.svd(cat, full_matrices=False)  # U [out, R], S [R], Vh [R, n*in]
    R = S.numel()
    r = R if rank is None else max(1, min(int(rank), R))
    blocks = Vh.reshape(R, n, in_dim)  # [R, n, in]: blocks[:, i] = V_i^T (column block i of Vh)
    v_bar = torch.einsum("n,rni->ri", f, blocks)  # [R, in]
    merged = (U[:, :r] * S[:r]) @ v_bar[:r]  # [out, in]
    return merged.to(dtype or weights.dtype)
