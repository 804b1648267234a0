"""GPTQ (Frantar et al. 2023) for one weight matrix given its input Hessian, group-wise symmetric integer codes.

Minimizes ``|| X W^T - X Wq^T ||^2`` column by column with the inverse-Hessian error feedback, in blocks of
``block_size`` columns (lazy batch updates). Codes and scales follow the RTN/compressed-tensors conventions of
:mod:`moecompress.quant.rtn` (plain group layout: group ``j`` is columns ``j*g .. (j+1)*g - 1``; no ``g_idx``).

Two orders:

- ``actorder=True`` (default; the "static" activation ordering): every group's scale is fixed up front from the
  *unpermuted* weight (clipping search, optionally weighted by the Hessian diagonal), then the columns are processed
  in descending order of the Hessian diagonal, so the most-used inputs are quantized first and their rounding error
  is absorbed by the many columns that follow. The groups stay where they are, so the output layout is unchanged.
- ``actorder=False``: natural column order, each group's scale computed from the error-updated weights when the
  group is reached (the reference "static_groups=False" variant).

Scale search per group (``clip``): a shrink of the absmax from a small grid minimizing the group's squared rounding
error, weighted per column by the Hessian diagonal by default (``'hmse'``; measured best with GPTQ on the built-in
model, bench/quant_bench.py), plain (``'mse'``) or none (``'none'``, absmax).

The Hessian factorization (damping, permutation, Cholesky of the inverse) depends only on ``H``: compute it once
with :func:`prepare_hessian` and pass it to :func:`gptq_quantize` for every candidate width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moecompress.quant.rtn import DEFAULT_CLIP_GRID, compute_scales, group_size_for, qrange

CLIP_MODES = ("none", "mse", "hmse")
DEFAULT_CLIP = "hmse"


def hessian_from_inputs(x: torch.Tensor) -> torch.Tensor:
    """``H = X^T X`` (float32) of inputs ``x [T, C]`` (unnormalized sum; add batches together)."""
    xf = x.float()
    return xf.T @ xf  # [C, C]


def _inverse_cholesky_(box: list[torch.Tensor], damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``H^-1`` after damping; more damping if needed for positive definiteness.

    ``box`` holds the only reference to ``H [C, C]`` (float32), whose diagonal is damped in place, so at most three
    [C, C] matrices exist here at once (H, its factor, the inverse; then H, the inverse, its factor)."""
    h = box.pop()
    diag_mean = torch.diag(h).mean().clamp_min(1e-8)
    d0 = h.diagonal().clone()  # [C] undamped diagonal
    for mult in (1.0, 10.0, 100.0, 1000.0):
        h.diagonal().copy_(d0 + damp * mult * diag_mean)  # = H + I * damp * mult * mean(diag H)
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            del chol
            chol_inv, info = torch.linalg.cholesky_ex(hinv, upper=True)
            del hinv
            if int(info) == 0:
                return chol_inv
    raise ValueError("Hessian is not positive definite even after damping")


@dataclass
class PreparedHessian:
    """What GPTQ needs from a Hessian, independent of the bit width (reuse it across candidate widths)."""

    hinv: torch.Tensor  # [C, C] upper Cholesky factor of the damped inverse, in processing order
    perm: torch.Tensor | None  # [C] processing order (None: natural order)
    dead: torch.Tensor  # [C] bool, inputs that never fire (zero diagonal)
    diag: torch.Tensor  # [C] Hessian diagonal (original order), weights of the "hmse" clipping search
    h: torch.Tensor | None = None  # [C, C] the Hessian (original order, dead diagonal 1), for ``refine_scales``


def prepare_hessian(
    h: torch.Tensor, damp: float = 0.01, actorder: bool = True, keep: bool = False, inplace: bool = False
) -> PreparedHessian:
    """Damp, order (descending diagonal when ``actorder``) and factorize ``h [C, C]`` once (``keep``: also keep
    the Hessian itself, which :func:`refine_scales` needs; ``inplace``: ``h`` may be changed and kept, no copy of
    it is made first). Besides ``h``, at most three [C, C] matrices exist at once."""
    h = h.float()
    if not inplace:
        h = h.clone()
    diag = torch.diag(h).clone()
    dead = diag == 0
    h[dead, dead] = 1.0
    kept = h if keep else None
    perm = None
    if actorder:
        perm = torch.argsort(torch.diag(h), descending=True, stable=True)
        box = [h[perm[:, None], perm]]  # [C, C] in processing order (one gather)
    else:
        box = [h.clone() if keep else h]  # factorized in place: the kept Hessian stays undamped
    del h
    return PreparedHessian(_inverse_cholesky_(box, damp), perm, dead, diag, kept)


def refine_scales(
    w: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, h: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Least-squares group scales for fixed codes: per row, ``s = argmin (w - Q s)^T H (w - Q s)`` (``Q [C, G]``
    holds the row's codes in its groups' columns), the output error of the row over the calibration inputs.

    ``w [R, C]`` the original weights, ``q [R, C]`` the codes, ``scales [R, G]`` (their dtype is kept), ``h [C, C]``.
    A row keeps its old scales unless the refined ones, rounded to the scale dtype, are positive and lower its
    error. Costs one ``[R, C] x [C, C]`` product per group row block, about one GPTQ run."""
    rows, cols = w.shape
    G = cols // group_size
    wf, qf, hf = w.float(), q.float(), h.float()
    qg = qf.unflatten(1, (G, group_size))  # [R, G, g]
    # A[r, g, g'] = sum_{c in g, c' in g'} q[r, c] H[c, c'] q[r, c']; b[r, g] = sum_{c in g} q[r, c] (H w_r)[c]
    a = torch.empty(rows, G, G, device=w.device)
    for j in range(G):
        cj = slice(j * group_size, (j + 1) * group_size)
        p = qf[:, cj] @ hf[cj, :]  # [R, C]: sum_{c' in g_j} q[r, c'] H[c', c]
        a[:, :, j] = (p.unflatten(1, (G, group_size)) * qg).sum(-1)
    b = ((wf @ hf).unflatten(1, (G, group_size)) * qg).sum(-1)  # [R, G]
    eye = torch.eye(G, device=w.device) * (a.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-12) * 1e-6)[:, None, None]
    new = torch.linalg.solve(a + eye, b.unsqueeze(-1)).squeeze(-1).to(scales.dtype)  # [R, G]

    def row_err(s: torch.Tensor) -> torch.Tensor:
        d = wf - qf * s.float().repeat_interleave(group_size, dim=1)  # [R, C]
        return ((d @ hf) * d).sum(-1)

    ok = torch.isfinite(new.float()).all(-1) & (new.float() > 0).all(-1)
    new = torch.where(ok[:, None], new, scales)
    better = ok & (row_err(new) < row_err(scales))
    return torch.where(better[:, None], new, scales)


def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor | None,
    bits: int,
    group_size: int | None = None,
    scale_dtype: torch.dtype = torch.bfloat16,
    damp: float = 0.01,
    block_size: int = 128,
    clip_grid: tuple[float, ...] = DEFAULT_CLIP_GRID,
    actorder: bool = True,
    clip: str = DEFAULT_CLIP,
    prepared: PreparedHessian | None = None,
    refine: bool = False,
    grid: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ-quantize ``w [R, C]`` with input Hessian ``h [C, C]`` (or its :func:`prepare_hessian` result).

    ``clip``: scale search per group, ``'none'`` (absmax), ``'mse'`` (weight squared error over ``clip_grid``) or
    ``'hmse'``, the default (squared error weighted by the Hessian diagonal: the expected output error of the
    rounding when inputs are uncorrelated). Runs on ``w``'s device.
    Returns ``(q [R, C] int8, scale [R, C // g] scale_dtype)`` with ``w ~= q * scale`` group-wise.
    Dead inputs (zero Hessian diagonal) get their weights zeroed, as in the reference implementation.
    ``refine``: afterwards, the group scales are refitted by least squares to the codes (:func:`refine_scales`;
    the prepared Hessian must have been made with ``keep=True``).
    ``grid``: another code grid than ``bits``-bit integers (e.g. quant/mxfp4.py's FP4), an object with
    ``scales(w [R, C], g, col_weight [C]) -> [R, C // g]`` and ``round(x) -> codes`` (integer-valued, int8 range).
    """
    if clip not in CLIP_MODES:
        raise ValueError(f"clip must be one of {CLIP_MODES}, got {clip!r}")
    rows, cols = w.shape
    g = group_size or group_size_for(cols)
    if cols % g:
        raise ValueError(f"group_size {g} must divide the input width {cols}")
    qmin, qmax = qrange(bits)
    shrinks = (1.0,) if clip == "none" else clip_grid
    ph = prepared if prepared is not None else prepare_hessian(h.to(w.device), damp, actorder, keep=refine)
    if (ph.perm is not None) != actorder:
        raise ValueError("the prepared Hessian was made with another actorder setting")
    if grid is not None and refine:
        raise ValueError("refine fits free scales: not with a grid of its own")
    if refine and ph.h is None:
        raise ValueError("refine needs a Hessian prepared with keep=True")
    w0 = None
    if refine:
        w0 = w.float().clone()
        w0[:, ph.dead] = 0.0
    wk = w.float().clone()  # [R, C]
    wk[:, ph.dead] = 0.0
    hinv = ph.hinv
    q_out = torch.zeros(rows, cols, dtype=torch.int8, device=w.device)
    if actorder:
        cw = ph.diag if clip == "hmse" else torch.ones(cols, device=w.device)
        scales = (
            grid.scales(wk, g, cw.to(w.device).float()) if grid is not None  # [R, G]
            else compute_scales(wk, bits, g, scale_dtype, shrinks, cw.to(w.device).float())
        )  # fmt: skip
        scales_f = scales.float()  # [R, G]
        group_of = ph.perm // g  # [C] group of each processed column
        wk = wk[:, ph.perm]
        q_perm = torch.zeros_like(q_out)
        for b0 in range(0, cols, block_size):
            b1 = min(b0 + block_size, cols)
            w_blk = wk[:, b0:b1].clone()
            err_blk = torch.zeros_like(w_blk)
            hinv_blk = hinv[b0:b1, b0:b1]
            s_blk = scales_f[:, group_of[b0:b1]]  # [R, n] scale of each processed column of the block
            for i in range(b1 - b0):
                s = s_blk[:, i]
                wcol = w_blk[:, i]
                qcol = grid.round(wcol / s) if grid is not None else torch.clamp(torch.round(wcol / s), qmin, qmax)
                q_perm[:, b0 + i] = qcol.to(torch.int8)
                err = (wcol - qcol * s) / hinv_blk[i, i]
                w_blk[:, i:] -= err.unsqueeze(1) @ hinv_blk[i, i:].unsqueeze(0)
                err_blk[:, i] = err
            wk[:, b1:] -= err_blk @ hinv[b0:b1, b1:]
        q_out[:, ph.perm] = q_perm
        del wk, q_perm, w_blk, err_blk  # [R, C] working copies, not needed by the refinement
        return (q_out, refine_scales(w0, q_out, scales, ph.h, g)) if refine else (q_out, scales)
    cw = ph.diag.to(w.device).float() if clip == "hmse" else torch.ones(cols, device=w.device)
    block_size = g if g >= block_size else (block_size // g) * g  # groups never straddle blocks
    scales = torch.zeros(rows, cols // g, dtype=scale_dtype, device=w.device)
    cur_scale = None
    for b0 in range(0, cols, block_size):
        b1 = min(b0 + block_size, cols)
        w_blk = wk[:, b0:b1].clone()  # [R, n]
        err_blk = torch.zeros_like(w_blk)
        hinv_blk = hinv[b0:b1, b0:b1]  # [n, n]
        for i in range(b1 - b0):
            col = b0 + i
            if col % g == 0:
                s = (
                    grid.scales(w_blk[:, i : i + g], g, cw[col : col + g])
                    if grid is not None
                    else compute_scales(w_blk[:, i : i + g], bits, g, scale_dtype, shrinks, cw[col : col + g])
                )[:, 0]  # [R]
                scales[:, col // g] = s
                cur_scale = s.float()
            wcol = w_blk[:, i]  # [R]
            qcol = (
                grid.round(wcol / cur_scale)
                if grid is not None
                else torch.clamp(torch.round(wcol / cur_scale), qmin, qmax)
            )
            q_out[:, col] = qcol.to(torch.int8)
            d = hinv_blk[i, i]
            err = (wcol - qcol * cur_scale) / d  # [R]
            w_blk[:, i:] -= err.unsqueeze(1) @ hinv_blk[i, i:].unsqueeze(0)
            err_blk[:, i] = err
        wk[:, b1:] -= err_blk @ hinv[b0:b1, b1:]
    return (q_out, refine_scales(w0, q_out, scales, ph.h, g)) if refine else (q_out, scales)
