"""Group-wise symmetric integer round-to-nearest (RTN) quantization.

Conventions (those of compressed-tensors' symmetric INT schemes, so outputs unpack with its decompressor):

- ``bits`` in {2, 3, 4, 8}; codes ``q`` are int8 in ``[-2^(b-1), 2^(b-1) - 1]``.
- Weights are quantized along their input (last) dimension in groups of ``group_size`` columns:
  ``w[..., r, c] ~= q[..., r, c] * scale[..., r, c // group_size]``.
- The scale of a group is ``shrink * absmax / ((2^b - 1) / 2)`` rounded to the storage dtype *before* the codes
  are computed, so dequantizing with the stored scale is exact. ``shrink`` is picked per group from a small grid
  (clipping search, minimizing the group's squared error); ``clip_grid=(1.0,)`` gives plain absmax RTN.
- Group size: 128 when it divides the input width, otherwise the largest power of two in 64..16 that divides it,
  otherwise one group per row (the whole input width; compressed-tensors requires the group to divide the width).

All functions accept any number of leading dimensions, so the fused 3-D expert tensors ``[E, R, C]`` are handled
in one call and equal a per-expert loop.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
DEFAULT_CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def group_size_for(cols: int, preferred: int = 128) -> int:
    """Group size used for an input width ``cols``: ``preferred`` if it divides, else 64/32/16, else ``cols``."""
    for g in (preferred, 64, 32, 16):
        if g <= cols and cols % g == 0:
            return g
    return cols


def qrange(bits: int) -> tuple[int, int]:
    """Signed code range ``(qmin, qmax)`` for ``bits``."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def _check(bits: int, cols: int, group_size: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if cols % group_size != 0:
        raise ValueError(f"group_size {group_size} must divide the input width {cols}")


SCALE_BLOCK_ELEMENTS = 1 << 20  # weights per block of rows in the scale search (its temporaries: ~4 MiB each)


def compute_scales(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    scale_dtype: torch.dtype = torch.bfloat16,
    clip_grid: tuple[float, ...] = DEFAULT_CLIP_GRID,
    col_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-group scales for ``w [..., R, C]`` -> ``[..., R, C // group_size]`` in ``scale_dtype``.

    For every group the shrink factor in ``clip_grid`` with the lowest squared reconstruction error wins; with
    ``col_weight [C]`` each column's squared error is weighted (e.g. by the Hessian diagonal: expected output error).
    Works a block of rows at a time (groups are independent), so its float32 temporaries stay near
    ``SCALE_BLOCK_ELEMENTS`` weights whatever the size of ``w``.
    """
    cols = w.shape[-1]
    _check(bits, cols, group_size)
    flat = w.reshape(-1, cols)  # [N, C]
    out = torch.empty(flat.shape[0], cols // group_size, dtype=scale_dtype, device=w.device)
    for r in _row_blocks(flat.shape[0], cols):
        out[r] = _search_scales(flat[r], bits, group_size, scale_dtype, clip_grid, col_weight)
    return out.reshape(*w.shape[:-1], cols // group_size)


def _row_blocks(rows: int, cols: int) -> Iterator[slice]:
    """Row slices of an [rows, cols] matrix of about ``SCALE_BLOCK_ELEMENTS`` elements each (at least one row)."""
    step = max(1, SCALE_BLOCK_ELEMENTS // max(1, cols))
    return (slice(r0, r0 + step) for r0 in range(0, rows, step))


def _search_scales(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    scale_dtype: torch.dtype,
    clip_grid: tuple[float, ...],
    col_weight: torch.Tensor | None,
) -> torch.Tensor:
    """:func:`compute_scales` of ``w [N, C]`` in one vectorized step."""
    cols = w.shape[-1]
    qmin, qmax = qrange(bits)
    wg = w.float().unflatten(-1, (cols // group_size, group_size))  # [N, G, g]
    absmax = wg.abs().amax(dim=-1)  # [N, G]
    cw = None if col_weight is None else col_weight.float().reshape(cols // group_size, group_size)  # [G, g]
    best_scale = None
    best_err = None
    for shrink in clip_grid:
        s = (absmax * shrink / ((qmax - qmin) / 2)).to(scale_dtype).float()  # [N, G]
        s = torch.where(s > 0, s, torch.ones_like(s))
        q = torch.clamp(torch.round(wg / s.unsqueeze(-1)), qmin, qmax)
        sq = (q * s.unsqueeze(-1) - wg).pow(2)  # [N, G, g]
        err = (sq if col_weight is None else sq * cw).sum(dim=-1)  # [N, G]
        if best_scale is None:
            best_scale, best_err = s, err
        else:
            better = err < best_err
            best_scale = torch.where(better, s, best_scale)
            best_err = torch.where(better, err, best_err)
    return best_scale.to(scale_dtype)


def quantize_with_scales(w: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Codes ``q [..., R, C]`` (int8) of ``w`` under given group scales ``[..., R, C // group_size]``; a block of
    rows at a time (``SCALE_BLOCK_ELEMENTS`` weights: each code depends on its own weight and scale only), so the
    float32 temporaries stay near 4 MiB each (an attention projection at DeepSeek-V3 dims, [7168, 7168]: ~0.6 GiB
    of [R, C] float32 temporaries before)."""
    qmin, qmax = qrange(bits)
    cols = w.shape[-1]
    wf, sf = w.reshape(-1, cols), scale.reshape(-1, scale.shape[-1])
    out = torch.empty(wf.shape, dtype=torch.int8, device=w.device)
    for r in _row_blocks(wf.shape[0], cols):
        s = sf[r].float().repeat_interleave(group_size, dim=-1)  # [n, C]
        out[r] = torch.clamp(torch.round(wf[r].float() / s), qmin, qmax)
    return out.reshape(w.shape)


def dequantize(q: torch.Tensor, scale: torch.Tensor, group_size: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``q [..., R, C] * scale [..., R, C // g]`` -> weights in ``dtype`` (default: the scale's dtype).

    The product is formed in float32 and rounded once, which equals compressed-tensors' dequantization in the
    scale dtype (a product of an 8-bit integer and a bf16/fp16 scale is exact in float32). Works
    ``SCALE_BLOCK_ELEMENTS`` weights of rows at a time (each weight is its own product): the float32 temporaries
    stay near 4 MiB each besides the result (DeepSeek-V3's gate/up, [4096, 7168]: 0.34 GiB of them before).
    """
    dtype = dtype or scale.dtype
    cols = q.shape[-1]
    qf, sf = q.reshape(-1, cols), scale.reshape(-1, scale.shape[-1])
    out = torch.empty(qf.shape, dtype=dtype, device=q.device)
    for r in _row_blocks(qf.shape[0], cols):
        blk = qf[r].float()
        blk.mul_(sf[r].float().repeat_interleave(group_size, dim=-1))
        out[r] = blk  # (rounded to dtype as the whole product was)
    return out.reshape(q.shape)


def rtn_quantize(
    w: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    scale_dtype: torch.dtype = torch.bfloat16,
    clip_grid: tuple[float, ...] = DEFAULT_CLIP_GRID,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest quantization of ``w [..., R, C]``.

    Returns ``(q [..., R, C] int8, scale [..., R, C // g] scale_dtype)``; ``g = group_size_for(C)`` by default.
    """
    g = group_size or group_size_for(w.shape[-1])
    scale = compute_scales(w, bits, g, scale_dtype, clip_grid)
    return quantize_with_scales(w, scale, bits, g), scale


def fake_quantize(
    w: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    scale_dtype: torch.dtype = torch.bfloat16,
    clip_grid: tuple[float, ...] = DEFAULT_CLIP_GRID,
) -> torch.Tensor:
    """RTN quantize then dequantize ``w [..., R, C]``, returned in ``w``'s dtype."""
    g = group_size or group_size_for(w.shape[-1])
    q, scale = rtn_quantize(w, bits, g, scale_dtype, clip_grid)
    return dequantize(q, scale, g, w.dtype)


def quantized_nbytes(rows: int, cols: int, bits: int, group_size: int, scale_bytes: int = 2) -> int:
    """Bytes on disk of one ``[rows, cols]`` projection in the pack-quantized layout.

    ``weight_packed`` int32 ``[rows, ceil(cols * bits / 32)]`` + ``weight_scale [rows, cols / g]`` +
    ``weight_shape`` (two int64).
    """
    packed_cols = -(-cols * bits // 32)
    return rows * packed_cols * 4 + rows * (cols // group_size) * scale_bytes + 16
