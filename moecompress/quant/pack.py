"""Exact int32 packing in the compressed-tensors "pack-quantized" layout (dense, compressed-tensors >= 0.19).

Layout of one row of ``C`` signed ``b``-bit codes: each code is offset to unsigned (``u = q + 2^(b-1)``) and written
at bit position ``i * b`` of the row's little-endian bit stream; word ``j`` of the output holds bits
``32 j .. 32 j + 31``. A code may straddle two words (3 bits). The row is zero-padded to a multiple of 32 codes and
the output truncated to ``ceil(C * b / 32)`` words. For 2, 4 and 8 bits this is the same as the older per-word
layout; for 3 bits it is the dense layout that vLLM 0.33 expects (pre-0.19 wrote 10 codes per word).

Vectorized over any leading dimensions (``[E, R, C]`` fused experts pack in one call), a block of rows at a time:
the int64 temporaries stay near ``BLOCK_ELEMENTS`` codes (a few 8-byte copies of them) whatever the tensor's size
(a whole layer's codes packed in one call had ~24 bytes of temporaries per code).
"""

from __future__ import annotations

import torch

_MASK32 = (1 << 32) - 1
BLOCK_ELEMENTS = 1 << 22  # codes per block of rows (int64 temporaries: ~32 MiB each)


def packed_cols(cols: int, bits: int) -> int:
    """Number of int32 words per row for ``cols`` codes of ``bits`` bits."""
    return -(-cols * bits // 32)


def _layout(bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    start = torch.arange(32, device=device, dtype=torch.int64) * bits
    return start // 32, start % 32  # word index, bit offset of each of 32 codes within a block of `bits` words


def pack_int32(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack int8 codes ``q [..., R, C]`` in ``[-2^(b-1), 2^(b-1))`` into int32 ``[..., R, ceil(C*b/32)]``."""
    if q.dtype != torch.int8:
        raise ValueError("codes must be int8")
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    *lead, cols = q.shape
    flat = q.reshape(-1, cols)  # [N, C] (a view when contiguous)
    out = torch.empty(flat.shape[0], packed_cols(cols, bits), dtype=torch.int32, device=q.device)
    step = max(1, BLOCK_ELEMENTS // max(cols, 1))
    for r0 in range(0, flat.shape[0], step):
        out[r0 : r0 + step] = _pack_rows(flat[r0 : r0 + step], bits)
    return out.reshape(*lead, out.shape[-1])


def _pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`pack_int32` of ``q [N, C]`` in one vectorized step."""
    rows, cols = q.shape
    u = q.to(torch.int64) + (1 << (bits - 1))  # [N, C] unsigned
    pad = (-cols) % 32
    if pad:
        u = torch.nn.functional.pad(u, (0, pad))
    blocks = u.shape[-1] // 32
    u = u.reshape(rows, blocks, 32)  # [N, n, 32]
    word, off = _layout(bits, q.device)
    out = torch.zeros(rows, blocks, bits + 1, dtype=torch.int64, device=q.device)  # one spare word for overflow
    lo = (u << off) & _MASK32  # [N, n, 32]
    hi = u >> (32 - off)  # bits spilling into the next word (0 when none)
    idx = word.expand_as(u)
    out.scatter_add_(-1, idx, lo)
    out.scatter_add_(-1, idx + 1, hi)
    out = out[..., :bits].reshape(rows, blocks * bits)[..., : packed_cols(cols, bits)]
    out = torch.where(out >= (1 << 31), out - (1 << 32), out)  # two's complement view as int32
    return out.to(torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: int32 ``[..., R, W]`` -> int8 codes ``[..., R, cols]``."""
    if packed.dtype != torch.int32:
        raise ValueError("packed weights must be int32")
    *lead, words = packed.shape
    if words != packed_cols(cols, bits):
        raise ValueError(f"{words} words cannot hold {cols} codes of {bits} bits")
    flat = packed.reshape(-1, words)  # [N, W]
    out = torch.empty(flat.shape[0], cols, dtype=torch.int8, device=packed.device)
    step = max(1, BLOCK_ELEMENTS // max(cols, 1))
    for r0 in range(0, flat.shape[0], step):
        out[r0 : r0 + step] = _unpack_rows(flat[r0 : r0 + step], bits, cols)
    return out.reshape(*lead, cols)


def _unpack_rows(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """:func:`unpack_int32` of ``packed [N, W]`` in one vectorized step."""
    rows, words = packed.shape
    v = packed.to(torch.int64) & _MASK32  # [N, W]
    blocks = -(-cols // 32)
    pad = blocks * bits + 1 - words  # +1 spare word so that word+1 is always addressable
    v = torch.nn.functional.pad(v, (0, pad))
    word, off = _layout(bits, packed.device)
    base = torch.arange(blocks, device=packed.device, dtype=torch.int64).unsqueeze(-1) * bits  # [n, 1]
    w0 = v[..., base + word]  # [N, n, 32]
    w1 = v[..., base + word + 1]
    u = ((w0 >> off) | (w1 << (32 - off))) & ((1 << bits) - 1)
    u = u.reshape(rows, blocks * 32)[..., :cols]
    return (u - (1 << (bits - 1))).to(torch.int8)
