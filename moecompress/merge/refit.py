"""Refit a merged expert's down projection on calibration tokens (pure tensor functions).

After merging, the merged expert c replaces its members. On the tokens routed to any member (top-k of the
original router, weights p renormalized as the model does), the members contributed
    y(x) = sum_{i in c and in top-k(x)} p_i(x) f_i(x),      s(x) = sum_{i in c and in top-k(x)} p_i(x),
and the merged expert will contribute about s(x) W_down h_c(x) (h_c: merged intermediate activation).
Weighted ridge least squares gives the down projection that best reproduces the members' contribution:
    W_down = argmin_W sum_x ||s(x) W h_c(x) - y(x)||^2 + lam ||W - W_merged||^2.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from moecompress.core.experts import Act
from moecompress.merge.align import activations

# ``lstsq_down`` makes its targets' float64 columns about this many bytes at a time
TARGET_BLOCK_BYTES = 1 << 25


def routing_weights(logits: torch.Tensor, top_k: int, norm_topk: bool) -> torch.Tensor:
    """Dense routing weights [T, E]: softmax probabilities kept on the top-k (renormalized when norm_topk)."""
    probs = logits.double().softmax(dim=1)  # [T, E]
    val, idx = probs.topk(top_k, dim=1)  # [T, k]
    if norm_topk:
        val = val / val.sum(dim=1, keepdim=True)
    return torch.zeros_like(probs).scatter(1, idx, val)


def refit_down(
    x: torch.Tensor,
    weights: torch.Tensor,
    members: list[int],
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    merged_gate: torch.Tensor,
    merged_up: torch.Tensor,
    merged_down: torch.Tensor,
    ridge: float = 1e-3,
    act_fn: Act = F.silu,
) -> torch.Tensor:
    """Least-squares down projection for a merged expert.

    Args:
        x: [T, H] calibration tokens; weights: [T, E] dense routing weights (``routing_weights``).
        members: old expert ids of the cluster; gate/up [E, I, H], down [E, H, I]: the original experts.
        merged_gate, merged_up: [I, H]; merged_down: [H, I] the merged expert (prior for the ridge term).
        ridge: penalty relative to the mean diagonal of the Gram matrix.
        act_fn: the experts' activation (pass the family's; SiLU only for callers that predate it).

    Returns:
        [H, I] refitted down projection (dtype of ``merged_down``); the merged one when no token reaches the cluster.
    """
    w = weights[:, members]  # [T, n]
    s = w.sum(dim=1)  # [T]
    rows = s > 0
    if not bool(rows.any()):
        return merged_down.clone()
    xs, ws, ss = x[rows].to(torch.float32), w[rows], s[rows]  # [t, H], [t, n], [t]
    y = torch.zeros(xs.shape[0], down.shape[1], dtype=torch.float64, device=xs.device)  # [t, H]
    for j, e in enumerate(members):
        on = ws[:, j] > 0
        if bool(on.any()):
            f = activations(xs[on], gate[e], up[e], act_fn).double() @ down[e].double().T  # [n_on, H]
            y[on] += ws[on, j, None] * f
    return refit_down_to(xs, y, ss, merged_gate, merged_up, merged_down, ridge, act_fn=act_fn)


def refit_down_to(
    x: torch.Tensor,
    target: torch.Tensor,
    scale: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    prior: torch.Tensor,
    ridge: float = 1e-3,
    act: torch.Tensor | None = None,
    act_fn: Act = F.silu,
) -> torch.Tensor:
    """Down projection W = argmin sum_t ||scale_t W h(x_t) - target_t||^2 + lam ||W - prior||^2 (explicit targets).

    Args:
        x: [t, H] tokens; target: [t, H] what the expert's weighted output should be on each token (e.g. the layer
        output minus every other expert's contribution); scale: [t] the expert's routing weight on each token.
        gate, up: [I, H] the expert (h = act_fn(gate x) * (up x)); prior: [H, I] current down projection.
        act: [t, I] h(x) when already computed (skips gate/up); act_fn: the experts' activation.

    Returns:
        [H, I] in the dtype of ``prior``.
    """
    h = activations(x, gate, up, act_fn) if act is None else act
    return lstsq_down(scale.double()[:, None] * h.double(), target, prior, ridge)


def lstsq_down(
    a: torch.Tensor,
    y: torch.Tensor | Callable[[int, int], torch.Tensor],
    prior: torch.Tensor,
    ridge: float = 1e-3,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Ridge least squares W = argmin sum_t ||W a_t - y_t||^2 + lam ||W - prior||^2.

    Args:
        a: [t, I] (weighted) intermediate activations; prior: [H, I] the current projection.
        y: [t, H] targets, or a function (h0, h1) -> their columns h0:h1 [t, h1 - h0] (made a block at a time: no
            [t, H] target is held; at H 7168 and 2,731 tokens 157 MB in float64).
        ridge: lam relative to the mean diagonal of the Gram matrix a^T a.
        dtype: the result's dtype (default: the dtype of ``prior``).

    Returns:
        [H, I] in ``dtype``, rounded once from float64.

    W = (y^T a + lam prior) (a^T a + lam)^-1 is solved a block of W's rows (``_row_blocks``) at a time against one LU
    factorization: each block's right-hand side y[:, block]^T a + lam prior[block] and its solution are those rows of
    the whole one's, bit for bit (tests/merge/test_merge_blocks), so no [H, I] float64 right-hand side nor solution
    is held (117 MB each at H 7168, I 2048).
    """
    a = a.double()
    gram = a.T @ a  # [I, I]
    lam = ridge * float(gram.diagonal().mean().clamp_min(1e-12))
    lu, piv = torch.linalg.lu_factor(gram + lam * torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device))
    del gram
    H = prior.shape[0]
    out = torch.empty(H, a.shape[1], dtype=dtype or prior.dtype, device=a.device)  # [H, I]
    for h0, h1 in _row_blocks(H, a.shape[0]):
        rhs = (y(h0, h1) if callable(y) else y[:, h0:h1]).double().T @ a  # [c, I]
        rhs += prior[h0:h1].double() * lam  # (a float64 prior is not scaled in place)
        out[h0:h1] = torch.linalg.lu_solve(lu, piv, rhs.T).T
    return out


def _row_blocks(H: int, t: int) -> list[tuple[int, int]]:
    """Row blocks of ``lstsq_down``'s solution: [t, c] float64 target columns of about ``TARGET_BLOCK_BYTES``, every
    width a multiple of 64 (blocks of such widths were measured bit for bit equal to the whole products, blocks of
    odd widths were not); one block when H is not a multiple of 64."""
    c = max(64, TARGET_BLOCK_BYTES // (8 * max(1, t)) // 64 * 64)
    if H % 64:
        return [(0, H)]
    return [(h0, min(h0 + c, H)) for h0 in range(0, H, c)]
