"""Router rows for merged experts (pure tensor functions).

A merged expert c stands for its members; the exact logit that gives it the members' combined routing
probability is LSE_c(x) = log sum_{i in c} exp(l_i(x)) (softmax over clusters of LSE_c = summed member
probabilities). Two rebuilds:

- ``merged_router_rows``: frequency-weighted average of member rows (no data needed).
- ``fit_router_rows``: fit each merged row on calibration tokens: ridge least squares to LSE_c, then optionally
  a few LBFGS steps on KL(summed member probabilities || new softmax). Singleton clusters keep their row.
"""

from __future__ import annotations

import torch

from moecompress.core.held import Held
from moecompress.merge.subspace import _normalized_weights

# ``RouterFitter.fit`` forms x^T target from float64 copies of this many bytes of x's columns at a time
XT_BLOCK_BYTES = 1 << 25


def merged_router_rows(
    w_router: torch.Tensor,
    clusters: list[list[int]],
    freqs: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Frequency-weighted average of member router rows (and biases).

    Args:
        w_router: [E, H] router weight.
        clusters: K lists of old expert ids; cluster c becomes new expert c.
        freqs: [E] routing frequencies (a never-routed cluster gets the plain average).
        bias: optional [E] router bias.

    Returns:
        ([K, H] rows, [K] bias or None), dtype of ``w_router``. A cluster of one keeps its row exactly.
    """
    rows, biases = [], []
    for members in clusters:
        f = _normalized_weights(freqs[members]).to(torch.float64)  # [n]
        rows.append(f @ w_router[members].to(torch.float64))  # [H]
        if bias is not None:
            biases.append(f @ bias[members].to(torch.float64))
    new_rows = torch.stack(rows).to(w_router.dtype)  # [K, H]
    for c, members in enumerate(clusters):
        if len(members) == 1:
            new_rows[c] = w_router[members[0]]
    new_bias = None
    if bias is not None:
        new_bias = torch.stack(biases).to(bias.dtype)
        for c, members in enumerate(clusters):
            if len(members) == 1:
                new_bias[c] = bias[members[0]]
    return new_rows, new_bias


def cluster_logits(logits: torch.Tensor, clusters: list[list[int]]) -> torch.Tensor:
    """Target cluster logits LSE_c = log sum_{i in c} exp(l_i): [T, E] -> [T, K]."""
    return torch.stack([torch.logsumexp(logits[:, m], dim=1) for m in clusters], dim=1)


def fit_router_rows(
    x: torch.Tensor,
    w_router: torch.Tensor,
    clusters: list[list[int]],
    bias: torch.Tensor | None = None,
    ridge: float = 1e-2,
    kl_steps: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fit the merged experts' router rows so that their routing matches the members' combined routing.

    Args:
        x: [T, H] calibration inputs of the router (the MoE block's input tokens).
        w_router: [E, H] original router weight; bias: optional [E] original bias.
        clusters: K lists of old expert ids.
        ridge: L2 penalty (relative to mean diag of X^T X) pulling each row towards the weighted average row.
        kl_steps: LBFGS iterations on KL(target cluster probs || new softmax) after the least-squares fit.

    Returns:
        ([K, H] rows, [K] bias or None) in the dtype of ``w_router``; singleton clusters keep their row exactly.
    """
    return RouterFitter(x, w_router, bias, ridge).fit(clusters, kl_steps)


class RouterFitter:
    """``fit_router_rows`` for many cluster lists on the same tokens and router: the Gram matrix, its Cholesky
    factor and the original logits are computed once (per layer, not per cluster), on the tokens' device."""

    def __init__(
        self,
        x: torch.Tensor,
        w_router: torch.Tensor,
        bias: torch.Tensor | None = None,
        ridge: float = 1e-2,
        dtypes: tuple[torch.dtype, torch.dtype | None] | None = None,
    ):
        """``dtypes``: (rows, bias) dtypes of the result (default: those of ``w_router`` and ``bias``)."""
        self.w_router, self.bias = w_router, bias
        self.dtypes = dtypes or (w_router.dtype, None if bias is None else bias.dtype)
        self.W = w_router.to(x.device, torch.float64)  # [E, H]
        self.x = x  # the float64 design matrix [T, H(+1)] is made from it when used (``_xa``), not held
        xf = x.to(torch.float64)  # [T, H]
        self.logits = xf @ self.W.T + (bias.to(x.device, torch.float64) if bias is not None else 0.0)  # [T, E]
        xa = torch.cat([xf, torch.ones_like(xf[:, :1])], dim=1) if bias is not None else xf  # [T, H(+1)]
        del xf
        gram = xa.T @ xa  # [D, D]
        del xa  # (at H 7168 and 2,731 fit tokens: 157 MB, not held beside the Gram matrix and its factor)
        self.lam = max(ridge * float(gram.diagonal().mean()), 1e-12)
        gram.diagonal().add_(self.lam)
        # gram + lam I is positive definite (lam > 0 unless x == 0); the factor is read by each ``fit`` alone: past
        # ``held.HELD_BYTES`` (411 MB at H 7168) it is kept in a file, resident during those reads only
        chol = torch.linalg.cholesky(gram)  # column-major, as LAPACK makes it
        del gram  # before the factor is copied to its file: not three [D, D] float64 at once
        # held as its transpose, a row-major tensor (the same memory order), so the factor read back from the file
        # (``chol.t.mT``) is column-major as made: the triangular solves in ``fit`` take it as it is
        self.chol = Held.of(chol.mT)
        del chol

    def _xa(self) -> torch.Tensor:
        """The design matrix [T, H(+1)] in float64: x, with a column of ones when the router has a bias."""
        xf = self.x.to(torch.float64)
        return torch.cat([xf, torch.ones_like(xf[:, :1])], dim=1) if self.bias is not None else xf

    def _xa_t(self, target: torch.Tensor) -> torch.Tensor:
        """``self._xa().T @ target`` [D, K] from float64 copies of ``XT_BLOCK_BYTES`` of x's columns at a time, not
        of all of x ([T, H] float64: 157 MB at H 7168 and 2,731 fit tokens); bit for bit the same rows (each is its
        own product over the tokens, as the one product computes it: tests/merge/test_merge_router)."""
        T, H = self.x.shape
        out = torch.empty(H + (self.bias is not None), target.shape[1], dtype=torch.float64, device=target.device)
        step = max(1, XT_BLOCK_BYTES // (8 * T))
        for c0 in range(0, H, step):
            c1 = min(c0 + step, H)
            out[c0:c1] = self.x[:, c0:c1].to(torch.float64).T @ target
        if self.bias is not None:
            out[H:] = torch.ones(T, 1, dtype=torch.float64, device=target.device).T @ target
        return out

    def fit(self, clusters: list[list[int]], kl_steps: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """([K, H] rows, [K] bias or None) for ``clusters`` (as ``fit_router_rows``)."""
        W, bias = self.W, self.bias
        target = cluster_logits(self.logits, clusters)  # [T, K]
        # Prior: frequency-free average row (routing frequencies are unknown here; the average is the fallback).
        prior = torch.stack([W[m].mean(0) for m in clusters])  # [K, H]
        b64 = bias.to(W.device, torch.float64) if bias is not None else None
        if b64 is not None:
            prior = torch.cat([prior, torch.stack([b64[m].mean() for m in clusters])[:, None]], 1)
        merged = [c for c, m in enumerate(clusters) if len(m) > 1]
        xa = self._xa() if kl_steps > 0 and merged else None  # the design matrix only for the KL refinement
        rhs = (xa.T @ target if xa is not None else self._xa_t(target)) + self.lam * prior.T  # [D, K]
        # cholesky_solve's two triangular solves made by hand: the same LAPACK solves, bit for bit, without the
        # column-major copy of the factor that cholesky_solve makes ([D, D] float64: 411 MB at H 7168, beside the
        # factor's own pages read from its file)
        L = self.chol.t.mT  # [D, D] lower, column-major
        sol = torch.linalg.solve_triangular(L.mT, torch.linalg.solve_triangular(L, rhs, upper=False), upper=True).T
        del L
        self.chol.drop()  # [K, D]
        if xa is not None:
            sol = _refine_kl(xa, target, sol, merged, kl_steps)
        del xa
        for c, m in enumerate(clusters):
            if len(m) == 1:
                sol[c] = torch.cat([W[m[0]], b64[m[0] : m[0] + 1]]) if b64 is not None else W[m[0]]
        rows = sol[:, : self.w_router.shape[1]].to(self.w_router.device, self.dtypes[0])
        new_bias = sol[:, -1].to(bias.device, self.dtypes[1]) if bias is not None else None
        return rows, new_bias


def _refine_kl(
    xa: torch.Tensor, target: torch.Tensor, sol: torch.Tensor, merged: list[int], steps: int
) -> torch.Tensor:
    """LBFGS on KL(softmax(target) || softmax(xa @ sol^T)) over the merged rows only."""
    p = target.softmax(dim=1)  # [T, K]
    fixed = sol.clone()
    free = sol[merged].clone().requires_grad_(True)
    opt = torch.optim.LBFGS([free], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        w = fixed.index_put((torch.tensor(merged, device=fixed.device),), free)  # [K, D]
        logq = (xa @ w.T).log_softmax(dim=1)  # [T, K]
        loss = (p * (p.clamp_min(1e-30).log() - logq)).sum(1).mean()
        loss.backward()
        return loss

    opt.step(closure)
    out = fixed.clone()
    out[merged] = free.detach()
    return out
