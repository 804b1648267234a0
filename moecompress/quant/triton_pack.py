"""Fused dequantize-and-multiply for the compressed-tensors pack-quantized layout (Triton, GPU).

``packed_linear(x [M, K], packed int32 [N, ceil(K b / 32)], scale [N, K / g], bits, g) -> x @ W^T [M, N]`` where
``W[n, k] = q[n, k] * scale[n, k // g]`` and ``q`` are the signed ``b``-bit codes of :mod:`moecompress.quant.pack`
(code ``k`` of a row at bit ``k b`` of the row's little-endian bit stream, offset by ``2^(b-1)``; a 3-bit code may
straddle two words). The weight tile of each K step is unpacked and dequantized in registers and fed to ``tl.dot``:
the dense weight never exists in memory.

Numbers: a weight is formed as ``(q * scale)`` in float32, rounded to the scale dtype, then cast to ``x``'s dtype,
exactly as :func:`moecompress.quant.rtn.dequantize` + ``.to(dtype)`` does, so the weights equal the torch path's
bit for bit; only the accumulation order of the matrix product differs (float32 accumulator; float32 inputs use
IEEE products, no TF32). Triton is optional: :func:`available` says whether this path can run for a tensor (CUDA
tensor and Triton importable, or any tensor under ``TRITON_INTERPRET=1``, the CPU interpreter used by the tests);
:class:`~moecompress.quant.packed_experts.PackedExperts` falls back to the torch path otherwise.
"""

import importlib.util
import os
from typing import Any

import torch

tl: Any = None  # triton.language, imported on first use (Triton is optional; see _define)
_packed_matmul: Any = None  # the kernel's Python source function, defined by _define
_KERNELS: dict[bool, Any] = {}


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def available(t: torch.Tensor) -> bool:
    """Whether :func:`packed_linear` can run on ``t``'s device here."""
    if not triton_installed():
        return False
    return t.device.type == "cuda" or (interpreting() and t.device.type == "cpu")


def _define() -> None:
    """Import Triton and define the kernel source at module level (its globals must hold ``tl``). Importing Triton
    only here keeps it optional, and lets a test switch the interpreter on (TRITON_INTERPRET=1) before Triton's
    own library functions are decorated at its import."""
    global tl, _packed_matmul
    if tl is not None:
        return
    import triton.language as tl

    def _packed_matmul(
        x_ptr,
        p_ptr,
        s_ptr,
        o_ptr,
        rows_ptr,
        slot_ptr,
        M,
        N,
        stride_xm,
        stride_xk,
        stride_pe,
        stride_se,
        stride_pn,
        stride_pw,
        stride_sn,
        stride_sg,
        stride_om,
        stride_on,
        K: tl.constexpr,
        W: tl.constexpr,
        BITS: tl.constexpr,
        GROUP: tl.constexpr,
        DOT_F32: tl.constexpr,
        GROUPED: tl.constexpr,
        SCALE_KIND: tl.constexpr,
        OUT_BF16: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] output rows
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
        if GROUPED:  # a block of rows of one expert: x rows gathered through rows_ptr (-1: padding), its weights
            slot = tl.load(slot_ptr + pid_m)
            rx = tl.load(rows_ptr + rm)
            m_ok = rx >= 0
            p_ptr += slot.to(tl.int64) * stride_pe
            s_ptr += slot.to(tl.int64) * stride_se
        else:
            rx = rm
            m_ok = rm < M
        n_ok = rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)  # [BK]
            k_ok = rk < K
            x = tl.load(
                x_ptr + rx[:, None] * stride_xm + rk[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :], other=0.0
            )  # [BM, BK]
            bit = rk * BITS
            word = bit // 32  # [BK] word of each code's first bit
            off = (bit % 32).to(tl.uint32)  # [BK] its bit offset
            nk = n_ok[:, None] & k_ok[None, :]
            w0 = tl.load(p_ptr + rn[:, None] * stride_pn + word[None, :] * stride_pw, mask=nk, other=0)
            w1 = tl.load(
                p_ptr + rn[:, None] * stride_pn + (word + 1)[None, :] * stride_pw,
                mask=nk & ((word + 1) < W)[None, :],
                other=0,
            )  # [BN, BK] int32: the next word, for codes that straddle two
            u0 = w0.to(tl.uint32, bitcast=True)
            u1 = w1.to(tl.uint32, bitcast=True)
            # (u1 << (32 - off)) written as two shifts so that off == 0 never shifts by 32
            u = ((u0 >> off[None, :]) | ((u1 << (31 - off)[None, :]) << 1)) & ((1 << BITS) - 1)
            q = u.to(tl.int32) - (1 << (BITS - 1))  # [BN, BK] signed codes
            s = tl.load(s_ptr + rn[:, None] * stride_sn + (rk // GROUP)[None, :] * stride_sg, mask=nk, other=0.0)
            w = q.to(tl.float32) * s.to(tl.float32)  # exact in float32
            # rounded once to the scale dtype, as rtn.dequantize does (bf16: integer round-to-nearest-even, so the
            # interpreter, whose float casts truncate, and the GPU round alike; the value stays a float32)
            if SCALE_KIND == 1:  # bfloat16 scales
                wb = w.to(tl.uint32, bitcast=True)
                w = ((wb + 0x7FFF + ((wb >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
            elif SCALE_KIND == 2:  # float16 scales
                w = w.to(tl.float16).to(tl.float32)
            if DOT_F32:  # float32 inputs (or the interpreter, whose dot has no bf16): IEEE products
                acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
            else:  # 16-bit inputs: tensor cores, float32 accumulator (bf16 x bf16 products are exact in float32)
                acc += tl.dot(x, tl.trans(w.to(x_ptr.dtype.element_ty)))
        o = o_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on
        if OUT_BF16:  # round to nearest even first: the cast below is then exact
            ab = acc.to(tl.uint32, bitcast=True)
            acc = ((ab + 0x7FFF + ((ab >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        tl.store(o, acc.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _kernel() -> Any:
    """The kernel, jitted (or wrapped for the interpreter) on first use: ``TRITON_INTERPRET`` is read then."""
    key = interpreting()
    if key not in _KERNELS:
        import triton

        _define()
        _KERNELS[key] = triton.jit(_packed_matmul)
    return _KERNELS[key]


def _dtype_flags(scale: torch.Tensor, out: torch.Tensor) -> dict[str, int]:
    """Compile-time dtype switches (scale rounding: 0 none, 1 bf16, 2 fp16; bf16 output rounding)."""
    kind = {torch.bfloat16: 1, torch.float16: 2}.get(scale.dtype, 0)
    return {"SCALE_KIND": kind, "OUT_BF16": int(out.dtype == torch.bfloat16)}


def _blocks(M: int, N: int) -> tuple[int, int, int]:
    """Tile sizes: tl.dot needs every dimension >= 16; a small M (decode) gets the smallest M tile."""
    bm = 16 if M <= 16 else 32 if M <= 32 else 64
    bn = 64 if N >= 64 else 32 if N >= 32 else 16
    return bm, bn, 32


def packed_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """``x [M, K] @ dequant(packed [N, W], scale [N, K / group])^T -> [M, N]`` in ``x``'s dtype (see module doc)."""
    if x.dim() != 2 or packed.dim() != 2 or scale.dim() != 2:
        raise ValueError("packed_linear takes x [M, K], packed [N, W], scale [N, K / group]")
    if packed.dtype != torch.int32:
        raise ValueError("packed weights must be int32")
    M, K = x.shape
    N, W = packed.shape
    if W != -(-K * bits // 32):
        raise ValueError(f"{W} words cannot hold {K} codes of {bits} bits")
    if K % group or scale.shape != (N, K // group):
        raise ValueError(f"scale has shape {tuple(scale.shape)}, expected {(N, K // group)}")
    if not (x.device == packed.device == scale.device):
        raise ValueError(f"x, packed and scale are on different devices ({x.device}, {packed.device}, {scale.device})")
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return out
    bm, bn, bk = _blocks(M, N)
    import triton

    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    _kernel()[grid](
        x, packed, scale, out, x, x, M, N,
        x.stride(0), x.stride(1), 0, 0, packed.stride(0), packed.stride(1), scale.stride(0), scale.stride(1),
        out.stride(0), out.stride(1),
        K=K, W=W, BITS=bits, GROUP=group, DOT_F32=x.dtype == torch.float32 or interpreting(), GROUPED=False,
        **_dtype_flags(scale, out),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
    )  # fmt: skip
    return out


GROUP_M = 16  # rows per block of the grouped kernel: each expert's rows are padded to a multiple of it


def align_rows(slots: torch.Tensor, num_slots: int, block: int = GROUP_M) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Schedule rows by expert slot for :func:`packed_grouped_linear`.

    ``slots [A]``: the slot (expert within one width's buffers) of each row, -1 for rows that are not computed.
    Returns ``(pos [A], block_slot [P / block], P)``: ``pos[a]`` is row ``a``'s position in the padded order
    (-1 when not computed); each slot's rows are contiguous and padded to a multiple of ``block``; block ``i`` of
    the padded order belongs to slot ``block_slot[i]``. One host sync (``P``)."""
    on = slots >= 0
    s = torch.where(on, slots, num_slots)  # not computed -> a sentinel slot after the real ones
    order = torch.argsort(s, stable=True)
    counts = torch.bincount(s, minlength=num_slots + 1)[:num_slots]  # [S]
    padded = (counts + block - 1) // block * block
    pstart = torch.cumsum(padded, 0) - padded
    cstart = torch.cumsum(counts, 0) - counts
    ss = s[order]
    real = ss < num_slots
    rank = torch.arange(order.numel(), device=slots.device)
    pos_sorted = torch.where(real, pstart[ss.clamp_max(num_slots - 1)] + rank - cstart[ss.clamp_max(num_slots - 1)], -1)
    pos = torch.empty_like(pos_sorted)
    pos[order] = pos_sorted
    P = int(padded.sum())
    block_slot = torch.repeat_interleave(torch.arange(num_slots, device=slots.device), padded // block)
    return pos, block_slot.to(torch.int32), P


def packed_grouped_linear(
    x: torch.Tensor, rows: torch.Tensor, block_slot: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
    bits: int, group: int, block: int = GROUP_M,
) -> torch.Tensor:  # fmt: skip
    """Many experts in one launch: output row ``i`` (of ``P = len(rows)``) is ``x[rows[i]] @ W_s^T`` with
    ``s = block_slot[i // block]`` and ``W_s`` = dequant(``packed [S, N, W]``, ``scale [S, N, K / group]``) of
    slot ``s``; ``rows[i] = -1`` marks padding (its output row is left unwritten). -> ``[P, N]`` in ``x``'s dtype."""
    if packed.dim() != 3 or scale.dim() != 3 or packed.dtype != torch.int32:
        raise ValueError("packed_grouped_linear takes packed int32 [S, N, W] and scale [S, N, K / group]")
    M, K = x.shape
    S, N, W = packed.shape
    P = rows.numel()
    if W != -(-K * bits // 32) or scale.shape != (S, N, K // group) or K % group:
        raise ValueError(f"packed {tuple(packed.shape)} / scale {tuple(scale.shape)} do not hold [{N}, {K}] codes")
    if P % block or block_slot.numel() != P // block:
        raise ValueError(f"{P} rows are not {block_slot.numel()} blocks of {block}")
    out = torch.empty(P, N, dtype=x.dtype, device=x.device)
    if P == 0:
        return out
    bn = 64 if N >= 64 else 32 if N >= 32 else 16
    import triton

    grid = (P // block, triton.cdiv(N, bn))
    _kernel()[grid](
        x, packed, scale, out, rows.to(torch.int32).contiguous(), block_slot.to(torch.int32).contiguous(), M, N,
        x.stride(0), x.stride(1), packed.stride(0), scale.stride(0), packed.stride(1), packed.stride(2),
        scale.stride(1), scale.stride(2), out.stride(0), out.stride(1),
        K=K, W=W, BITS=bits, GROUP=group, DOT_F32=x.dtype == torch.float32 or interpreting(), GROUPED=True,
        **_dtype_flags(scale, out),
        BLOCK_M=block, BLOCK_N=bn, BLOCK_K=32,
    )  # fmt: skip
    return out
