"""GPTQ (Frantar et al. 2023) for one weight matrix given its input Hessian, group-wise symmetric integer codes.

Minimizes ``|| X W^T - X Wq^T ||^2`` column by column with the inverse-Hessian error feedback, in blocks of
``block_size`` columns (lazy batch updates). Group scales are computed from the error-updated weights when the
group is reached (the standard "static_groups=False" variant), with the same clipping search as RTN, so codes and
scales follow exactly the RTN/compressed-tensors conventions of :mod:`moecompress.quant.rtn`.
No activation reordering (it would permute groups and break the plain group layout).
"""

from __future__ import annotations

import torch

from moecompress.quant.rtn import DEFAULT_CLIP_GRID, compute_scales, group_size_for, qrange


def hessian_from_inputs(x: torch.Tensor) -> torch.Tensor:
    """``H = X^T X`` (float32) of inputs ``x [T, C]`` (unnormalized sum; add batches together)."""
    xf = x.float()
    return xf.T @ xf  # [C, C]


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``H^-1`` after damping; more damping if needed for positive definiteness."""
    cols = h.shape[0]
    diag_mean = torch.diag(h).mean().clamp_min(1e-8)
    eye = torch.eye(cols, dtype=h.dtype, device=h.device)
    for mult in (1.0, 10.0, 100.0, 1000.0):
        hd = h + eye * (damp * mult * diag_mean)
        chol, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            chol_inv, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return chol_inv
    raise ValueError("Hessian is not positive definite even after damping")


def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    scale_dtype: torch.dtype = torch.bfloat16,
    damp: float = 0.01,
    block_size: int = 128,
    clip_grid: tuple[float, ...] = DEFAULT_CLIP_GRID,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ-quantize ``w [R, C]`` with input Hessian ``h [C, C]``.

    Returns ``(q [R, C] int8, scale [R, C // g] scale_dtype)`` with ``w ~= q * scale`` group-wise.
    Dead inputs (zero Hessian diagonal) get their weights zeroed, as in the reference implementation.
    """
    rows, cols = w.shape
    g = group_size or group_size_for(cols)
    if cols % g:
        raise ValueError(f"group_size {g} must divide the input width {cols}")
    qmin, qmax = qrange(bits)
    block_size = g if g >= block_size else (block_size // g) * g  # groups never straddle blocks
    wk = w.float().clone()  # [R, C]
    h = h.float().clone()  # [C, C]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    wk[:, dead] = 0.0
    hinv = _inverse_cholesky(h, damp)  # [C, C] upper
    q_out = torch.zeros(rows, cols, dtype=torch.int8, device=w.device)
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
                s = compute_scales(w_blk[:, i : i + g], bits, g, scale_dtype, clip_grid)[:, 0]  # [R]
                scales[:, col // g] = s
                cur_scale = s.float()
            wcol = w_blk[:, i]  # [R]
            qcol = torch.clamp(torch.round(wcol / cur_scale), qmin, qmax)
            q_out[:, col] = qcol.to(torch.int8)
            d = hinv_blk[i, i]
            err = (wcol - qcol * cur_scale) / d  # [R]
            w_blk[:, i:] -= err.unsqueeze(1) @ hinv_blk[i, i:].unsqueeze(0)
            err_blk[:, i] = err
        wk[:, b1:] -= err_blk @ hinv[b0:b1, b1:]
    return q_out, scales
