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

Batched: :func:`prepare_hessian_batched` and :func:`gptq_quantize_batched` do the same for N experts' matrices of one
projection at once (``w [N, R, C]``, ``H [N, C, C]``), each step one kernel for all N: on a GPU, where every kernel
costs microseconds whatever its size, the per-expert column loop is launch-bound. They equal a loop of the per-expert
functions up to float rounding (on the CPU bit for bit: the same products, batched).
"""

from __future__ import annotations

from collections.abc import Callable
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


def _inverse_cholesky_(
    box: list[torch.Tensor], damp: float, rebuild: Callable[[], torch.Tensor] | None = None
) -> torch.Tensor:
    """Upper Cholesky factor of ``H^-1`` after damping; more damping if needed for positive definiteness.

    ``box`` holds the only reference to ``H [C, C]`` (float32), whose diagonal is damped in place, so at most three
    [C, C] matrices exist here at once (H, its factor, the inverse; then H, the inverse, its factor). ``rebuild``:
    gives H (undamped) again; then H is let go once its factor exists (two [C, C] at once, not three; a retry
    with more damping rebuilds it: the same matrix, so the same factor bit for bit)."""
    h = box.pop()
    diag_mean = torch.diag(h).mean().clamp_min(1e-8)
    d0 = h.diagonal().clone()  # [C] undamped diagonal
    for mult in (1.0, 10.0, 100.0, 1000.0):
        if h is None:
            h = rebuild()
        h.diagonal().copy_(d0 + damp * mult * diag_mean)  # = H + I * damp * mult * mean(diag H)
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            if rebuild is not None:
                h = None
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

    def at(self, k: int) -> PreparedHessian:
        """Expert ``k``'s of a batch made by :func:`prepare_hessian_batched` (views, no copies)."""
        return PreparedHessian(
            self.hinv[k], None if self.perm is None else self.perm[k], self.dead[k], self.diag[k],
            None if self.h is None else self.h[k],
        )  # fmt: skip


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
    rebuild = None
    if actorder:
        perm = torch.argsort(torch.diag(h), descending=True, stable=True)
        box = [h[perm[:, None], perm]]  # [C, C] in processing order (one gather)
        if keep:  # the gather can be made again from the kept Hessian: not held beside its factor and inverse
            rebuild = lambda: kept[perm[:, None], perm]  # noqa: E731
    else:
        box = [h.clone() if keep else h]  # factorized in place: the kept Hessian stays undamped
        if keep:
            rebuild = kept.clone
    del h
    return PreparedHessian(_inverse_cholesky_(box, damp, rebuild), perm, dead, diag, kept)


# refine_scales works on a block of rows at a time (rows are independent), so its float32 temporaries stay near this
# many weights (~16 MiB each) whatever R: whole-matrix temporaries at DeepSeek-V3's gate/up (R 4096, C 7168: ~six
# [R, C] float32 copies) added 0.64 GiB to the per-expert GPTQ peak; the same products, rows split (bit for bit)
REFINE_BLOCK_ELEMENTS = 1 << 22


def refine_scales(
    w: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, h: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Least-squares group scales for fixed codes: per row, ``s = argmin (w - Q s)^T H (w - Q s)`` (``Q [C, G]``
    holds the row's codes in its groups' columns), the output error of the row over the calibration inputs.

    ``w [R, C]`` the original weights, ``q [R, C]`` the codes, ``scales [R, G]`` (their dtype is kept), ``h [C, C]``.
    A row keeps its old scales unless the refined ones, rounded to the scale dtype, are positive and lower its
    error. Costs one ``[R, C] x [C, C]`` product per group row block, about one GPTQ run. Rows are refined
    ``REFINE_BLOCK_ELEMENTS // C`` at a time (each row's result does not depend on the others)."""
    rows, cols = w.shape
    hf = h.float()
    step = max(1, REFINE_BLOCK_ELEMENTS // cols)
    if step >= rows:
        return _refine_rows(w, q, scales, hf, group_size)
    out = torch.empty_like(scales)
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        out[r0:r1] = _refine_rows(w[r0:r1], q[r0:r1], scales[r0:r1], hf, group_size)
    return out


def _refine_rows(
    w: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, hf: torch.Tensor, group_size: int
) -> torch.Tensor:
    """:func:`refine_scales` of the rows ``w [R, C]`` (``hf [C, C]`` float32)."""
    rows, cols = w.shape
    G = cols // group_size
    wf, qf = w.float(), q.float()
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
    dead = bool(ph.dead.any())
    if refine:
        w0 = w.float()  # read only: a copy only where dead inputs are zeroed (at DeepSeek-V3's gate/up, 112 MiB)
        if dead:
            w0 = w0.clone()
            w0[:, ph.dead] = 0.0
    hinv = ph.hinv
    q_out = torch.zeros(rows, cols, dtype=torch.int8, device=w.device)
    if actorder:
        # the scales read w with dead inputs zeroed, the loop its permuted copy: without dead inputs, a float32
        # w itself is read and only the permuted copy is made (one [R, C] float32 fewer: 112 MiB at DeepSeek-V3's
        # gate/up; the same values)
        wk = w.float()
        if dead:
            wk = wk.clone()
            wk[:, ph.dead] = 0.0
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
    wk = w.float().clone()  # [R, C]
    wk[:, ph.dead] = 0.0
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


# ---- batched: N matrices of one projection at once (a chunk of experts); equal to a loop of the functions above ----


def _inverse_cholesky_batched_(p: torch.Tensor, damp: float, step: int | None = None) -> torch.Tensor:
    """:func:`_inverse_cholesky_` of ``p [N, C, C]`` (float32, damped and then overwritten in place): returns ``p``
    holding the upper Cholesky factors of the damped inverses. Works ``step`` matrices at a time (default all):
    besides ``p``, about three [step, C, C] temporaries. A matrix that is not positive definite is retried with
    more damping on its own; one host sync per slice and round, never one per matrix."""
    n = p.shape[0]
    step = n if step is None else max(1, step)
    d0 = p.diagonal(dim1=-2, dim2=-1).clone()  # [N, C] undamped diagonals
    diag_mean = d0.mean(-1).clamp_min(1e-8)  # [N]
    for s0 in range(0, n, step):
        s1 = min(n, s0 + step)
        todo = torch.arange(s0, s1, device=p.device)  # [m] matrices still to factorize
        out = None
        for mult in (1.0, 10.0, 100.0, 1000.0):
            sub = p[s0:s1] if todo.numel() == s1 - s0 else p[todo]  # [m, C, C] (a view, then a copy of the rest)
            sub.diagonal(dim1=-2, dim2=-1).copy_(d0[todo] + damp * mult * diag_mean[todo, None])
            chol, info = torch.linalg.cholesky_ex(sub)
            hinv = torch.cholesky_inverse(chol)
            del chol
            u, info2 = torch.linalg.cholesky_ex(hinv, upper=True)
            del hinv
            ok = ((info == 0) & (info2 == 0)).cpu()  # [m], the round's one host sync
            if out is None and bool(ok.all()):
                p[s0:s1] = u
                break
            out = u.new_zeros(s1 - s0, *u.shape[1:]) if out is None else out
            out[todo[ok.to(todo.device)] - s0] = u[ok.to(u.device)]
            todo = todo[~ok.to(todo.device)]
            del u
            if not todo.numel():
                p[s0:s1] = out
                break
        else:
            raise ValueError("Hessian is not positive definite even after damping")
    return p


def prepare_hessian_batched(
    h: torch.Tensor,
    damp: float = 0.01,
    actorder: bool = True,
    keep: bool = False,
    inplace: bool = False,
    step: int | None = None,
) -> PreparedHessian:
    """:func:`prepare_hessian` of ``h [N, C, C]`` (N experts' Hessians of one projection) in one batched pass: the
    fields of the result have a leading dim N (``hinv [N, C, C]``, ``perm [N, C]``, ``dead``/``diag [N, C]``, ``h``),
    ``PreparedHessian.at(k)`` is expert k's. Equal to a loop of :func:`prepare_hessian` up to float rounding (on
    the CPU bit for bit). Memory: besides ``h`` (with ``keep`` or ``not inplace`` a copy), one [N, C, C] (the
    factors) and ~3 [step, C, C] while factorizing (``step``: matrices per Cholesky call, default all)."""
    h = h.float()
    if not inplace:
        h = h.clone()
    n = h.shape[0]
    diag = h.diagonal(dim1=-2, dim2=-1).clone()  # [N, C]
    dead = diag == 0
    h.diagonal(dim1=-2, dim2=-1)[dead] = 1.0
    kept = h if keep else None
    perm = None
    if actorder:
        perm = torch.argsort(h.diagonal(dim1=-2, dim2=-1), dim=-1, descending=True, stable=True)  # [N, C]
        rows = torch.arange(n, device=h.device)[:, None, None]
        p = h[rows, perm[:, :, None], perm[:, None, :]]  # [N, C, C] in processing order (one gather)
    else:
        p = h.clone() if keep else h  # factorized in place: the kept Hessians stay undamped
    del h
    return PreparedHessian(_inverse_cholesky_batched_(p, damp, step), perm, dead, diag, kept)


def gptq_quantize_batched(
    w: torch.Tensor,
    prepared: PreparedHessian,
    bits: int,
    group_size: int | None = None,
    scale_dtype: torch.dtype = torch.bfloat16,
    block_size: int = 128,
    clip_grid: tuple[float, ...] = DEFAULT_CLIP_GRID,
    actorder: bool = True,
    clip: str = DEFAULT_CLIP,
    refine: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`gptq_quantize` of ``w [N, R, C]``, N experts' weights of one projection, with their Hessians prepared by
    :func:`prepare_hessian_batched`: the column loop runs over ``[N, R]`` at once and the lazy block updates are
    batched products, so a GPU runs one kernel per step for all N (the per-expert function is launch-bound there).
    Returns ``(q [N, R, C] int8, scale [N, R, C // g])``, equal to a loop of :func:`gptq_quantize` up to float
    rounding (on the CPU bit for bit). Scale searches and the refinement run expert by expert (a few kernels per
    group, outside the column loop). Memory: two or three [N, R, C] float32 working copies (the weights with dead
    inputs zeroed, their permuted working copy, int8 codes) besides the prepared Hessians."""
    if clip not in CLIP_MODES:
        raise ValueError(f"clip must be one of {CLIP_MODES}, got {clip!r}")
    n, rows, cols = w.shape
    g = group_size or group_size_for(cols)
    if cols % g:
        raise ValueError(f"group_size {g} must divide the input width {cols}")
    ph = prepared
    if ph.hinv.dim() != 3 or ph.hinv.shape[0] != n:
        raise ValueError(f"the prepared Hessians are not a batch of {n} (use prepare_hessian_batched)")
    if (ph.perm is not None) != actorder:
        raise ValueError("the prepared Hessian was made with another actorder setting")
    if refine and ph.h is None:
        raise ValueError("refine needs a Hessian prepared with keep=True")
    qmin, qmax = qrange(bits)
    shrinks = (1.0,) if clip == "none" else clip_grid
    dev = w.device
    w0 = w.float().clone().masked_fill_(ph.dead.to(dev)[:, None, :], 0.0)  # [N, R, C], dead inputs zeroed
    cw = ph.diag.to(dev).float() if clip == "hmse" else torch.ones(n, cols, device=dev)  # [N, C]
    hinv = ph.hinv
    q_out = torch.zeros(n, rows, cols, dtype=torch.int8, device=dev)
    if actorder:
        scales = torch.stack([compute_scales(w0[k], bits, g, scale_dtype, shrinks, cw[k]) for k in range(n)])
        scales_f = scales.float()  # [N, R, G]
        perm = ph.perm.to(dev)  # [N, C]
        group_of = perm // g  # [N, C] group of each processed column
        wk = w0.gather(2, perm[:, None, :].expand(n, rows, cols))  # [N, R, C] in processing order
        w0 = w0 if refine else None  # the refinement's original weights
        q_perm = torch.zeros_like(q_out)
        for b0 in range(0, cols, block_size):
            b1 = min(b0 + block_size, cols)
            m = b1 - b0
            # the block column-major, so that column i is one contiguous [N, R] (fewest kernels per column)
            w_t = wk[:, :, b0:b1].permute(2, 0, 1).contiguous()  # [m, N, R]
            s_t = scales_f.gather(2, group_of[:, None, b0:b1].expand(n, rows, m)).permute(2, 0, 1).contiguous()
            h_t = hinv[:, b0:b1, b0:b1].permute(1, 2, 0).contiguous()  # [m, m, N]: h_t[i, j, k] = hinv[k][i, j]
            d_t = h_t.diagonal(dim1=0, dim2=1).T.unsqueeze(-1).contiguous()  # [m, N, 1] Hinv[i, i]
            q_t = torch.empty_like(w_t)  # [m, N, R] codes (float)
            e_t = torch.empty_like(w_t)  # [m, N, R] scaled errors
            for i in range(m):  # per column 8 kernels for the whole batch, written into the block's rows
                wcol, s, qcol, err = w_t[i], s_t[i], q_t[i], e_t[i]  # [N, R]
                torch.div(wcol, s, out=qcol).round_().clamp_(qmin, qmax)
                torch.sub(wcol, torch.mul(qcol, s, out=err), out=err).div_(d_t[i])  # (w - q s) / Hinv[i, i]
                if i + 1 < m:  # the rest of the block: w_j -= err * Hinv[i, j] (the outer product, exactly)
                    w_t[i + 1 :].sub_(h_t[i, i + 1 :, :, None] * err)
            q_perm[:, :, b0:b1] = q_t.permute(1, 2, 0).to(torch.int8)
            wk[:, :, b1:] -= e_t.permute(1, 2, 0).contiguous() @ hinv[:, b0:b1, b1:]  # [N, R, m] x [N, m, C - b1]
        q_out.scatter_(2, perm[:, None, :].expand(n, rows, cols), q_perm)
        del wk, q_perm, w_t, q_t, e_t  # [N, R, C] working copies, not needed by the refinement
    else:
        wk = w0.clone() if refine else w0  # updated in place by the column loop
        block_size = g if g >= block_size else (block_size // g) * g  # groups never straddle blocks
        scales = torch.zeros(n, rows, cols // g, dtype=scale_dtype, device=dev)
        cur_scale = None
        for b0 in range(0, cols, block_size):
            b1 = min(b0 + block_size, cols)
            w_blk = wk[:, :, b0:b1].clone()  # [N, R, m]
            err_blk = torch.zeros_like(w_blk)
            hinv_blk = hinv[:, b0:b1, b0:b1]  # [N, m, m]
            for i in range(b1 - b0):
                col = b0 + i
                if col % g == 0:
                    s = torch.stack(
                        [
                            compute_scales(w_blk[k, :, i : i + g], bits, g, scale_dtype, shrinks, cw[k, col : col + g])
                            for k in range(n)
                        ]
                    )[:, :, 0]  # [N, R]
                    scales[:, :, col // g] = s
                    cur_scale = s.float()
                wcol = w_blk[:, :, i]  # [N, R]
                qcol = torch.clamp(torch.round(wcol / cur_scale), qmin, qmax)
                q_out[:, :, col] = qcol.to(torch.int8)
                err = (wcol - qcol * cur_scale) / hinv_blk[:, i, i, None]
                w_blk[:, :, i:] -= err.unsqueeze(2) @ hinv_blk[:, i : i + 1, i:]
                err_blk[:, :, i] = err
            wk[:, :, b1:] -= err_blk @ hinv[:, b0:b1, b1:]
        del wk, w_blk, err_blk
    if refine:
        scales = torch.stack([refine_scales(w0[k], q_out[k], scales[k], ph.h[k], g) for k in range(n)])
    return q_out, scales
