"""The fused Triton dequantize-and-multiply kernel (quant/triton_pack.py) against the torch path, on CPU through
Triton's interpreter (TRITON_INTERPRET=1); on CUDA the same kernel is compiled (bench/gpu_check.py checks it)."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from moecompress.quant import triton_pack
from moecompress.quant.pack import pack_int32
from moecompress.quant.packed_experts import PackedExperts, set_kernel
from moecompress.quant.rtn import dequantize, rtn_quantize

needs_triton = pytest.mark.skipif(
    not triton_pack.triton_installed(), reason="triton is not installed (optional: pip install '.[gpu]')"
)


def _triton_modules() -> dict:
    return {k: v for k, v in sys.modules.items() if k == "triton" or k.startswith("triton.")}


@pytest.fixture(scope="module")
def interpreted_triton():
    """Triton in interpreter mode for this module. The interpreter must be on when Triton is imported (Triton
    decorates its own library functions then), and in a full run something imported it before (bitsandbytes and
    compressed-tensors do): its Python modules are then swapped for a fresh import with TRITON_INTERPRET=1 (its
    compiled extension is kept) and restored afterwards, and moecompress's kernel is re-bound to the fresh import."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TRITON_INTERPRET", "1")
    saved = _triton_modules()
    swap = bool(saved) and type(getattr(saved.get("triton.language.standard"), "zeros_like", None)).__name__ != (
        "InterpretedFunction"
    )
    if swap:
        for k in saved:
            if not k.startswith("triton._C"):
                del sys.modules[k]
    mp.setattr(triton_pack, "tl", None)
    mp.setattr(triton_pack, "_packed_matmul", None)
    mp.setattr(triton_pack, "_KERNELS", {})
    try:
        yield
    finally:
        mp.undo()
        if swap:
            for k in _triton_modules():
                del sys.modules[k]
            sys.modules.update(saved)


@pytest.fixture
def interpret(interpreted_triton, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _packed(N: int, K: int, bits: int, group: int, seed: int, scale_dtype=torch.bfloat16):
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(seed))
    q, s = rtn_quantize(w, bits, group, scale_dtype=scale_dtype)
    return q, s, pack_int32(q, bits)


@needs_triton
@pytest.mark.parametrize("bits", [4, 3, 2, 8])
@pytest.mark.parametrize(("N", "K", "group"), [(24, 32, 32), (40, 72, 24)])
def test_kernel_weights_are_the_dequantized_codes_exactly(interpret, bits, N, K, group):
    """x = identity: every output is one product with 1.0, so the kernel's unpacked and dequantized weights must
    equal rtn.dequantize bit for bit (3 bits: codes straddle words; K not a multiple of 32: a partial last word)."""
    q, s, p = _packed(N, K, bits, group, seed=bits * 100 + K)
    got = triton_pack.packed_linear(torch.eye(K), p, s, bits, group)  # [K, N] = W^T
    assert torch.equal(got, dequantize(q, s, group).float().T)


@needs_triton
@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 5, 33])
def test_kernel_matches_torch_linear(interpret, bits, dtype, M):
    N, K, group = 48, 96, 32
    q, s, p = _packed(N, K, bits, group, seed=M)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(7)).to(dtype)
    ref = nn.functional.linear(x, dequantize(q, s, group).to(dtype))  # the torch path's numbers
    got = triton_pack.packed_linear(x, p, s, bits, group)
    assert got.dtype == dtype and got.shape == (M, N)
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)  # summation order only
    else:  # float32 accumulation, one rounding to bf16 at the end (torch also accumulates in float32)
        torch.testing.assert_close(got.float(), ref.float(), rtol=1.6e-2, atol=1e-2)
        assert (got == ref).float().mean() > 0.9


@needs_triton
def test_kernel_rejects_bad_shapes(interpret):
    q, s, p = _packed(16, 64, 4, 32, seed=0)
    with pytest.raises(ValueError, match="words cannot hold"):
        triton_pack.packed_linear(torch.randn(2, 64), p, s, 3, 32)
    with pytest.raises(ValueError, match="scale has shape"):
        triton_pack.packed_linear(torch.randn(2, 64), p, s, 4, 16)
    with pytest.raises(ValueError, match="int32"):
        triton_pack.packed_linear(torch.randn(2, 64), p.float(), s, 4, 32)


@needs_triton
def test_grouped_kernel_equals_one_launch_per_expert(interpret):
    """Rows of several experts in one launch (rows scheduled by align_rows, padded per expert, -1 rows skipped)
    give each row exactly what packed_linear gives for its own expert."""
    S, N, K, bits, group = 3, 40, 64, 3, 32
    qs = [_packed(N, K, bits, group, seed=s) for s in range(S)]
    packed = torch.stack([p for _, _, p in qs])  # [S, N, W]
    scale = torch.stack([s for _, s, _ in qs])  # [S, N, K / g]
    x = torch.randn(11, K, generator=torch.Generator().manual_seed(5))
    slots = torch.tensor([2, 0, -1, 2, 2, 1, 0, -1, 2, 0, 2])  # slot per row of x, -1: not computed
    pos, block_slot, P = triton_pack.align_rows(slots, S, block=16)
    assert P == 3 * 16 and block_slot.tolist() == [0, 1, 2]  # 3, 1 and 5 rows, each padded to 16
    assert (pos[slots < 0] == -1).all() and len(set(pos[slots >= 0].tolist())) == 9
    rows = torch.full((P,), -1)
    rows[pos[slots >= 0]] = torch.nonzero(slots >= 0).squeeze(1)
    out = triton_pack.packed_grouped_linear(x, rows, block_slot, packed, scale, bits, group, block=16)  # [P, N]
    for r in range(11):
        if slots[r] >= 0:
            s = int(slots[r])
            want = triton_pack.packed_linear(x[r : r + 1], packed[s], scale[s], bits, group)[0]
            torch.testing.assert_close(out[pos[r]], want, rtol=1e-6, atol=1e-6)
            assert pos[r] // 16 == s  # its block belongs to its expert


def _experts(E: int, H: int, I: int, bits: list[int], seed: int = 0) -> PackedExperts:
    """PackedExperts built from random RTN-quantized experts (per-expert widths), as the loader builds it."""
    g = torch.Generator().manual_seed(seed)
    experts = []
    for e in range(E):
        entry = {}
        for name, (r, c) in {"gate": (I, H), "up": (I, H), "down": (H, I)}.items():
            q, s = rtn_quantize(torch.randn(r, c, generator=g) * 0.2, bits[e], 16 if c % 16 == 0 else c)
            entry[name] = (pack_int32(q, bits[e]), s)
        experts.append(entry)
    return PackedExperts.from_experts(experts, bits, nn.functional.silu)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_experts_triton_equals_torch_path(interpret, dtype):
    """The whole experts forward (mixed 4/3-bit experts, unhit experts, routing weights) through the fused kernel
    equals the torch path up to summation order."""
    mod = _experts(6, 32, 48, [4, 3, 4, 3, 3, 4])
    g = torch.Generator().manual_seed(1)
    h = torch.randn(7, 32, generator=g).to(dtype)
    idx = torch.tensor([[0, 1], [1, 3], [3, 0], [0, 5], [5, 1], [1, 0], [3, 5]])  # experts 2 and 4 never hit
    w = torch.rand(7, 2, generator=g).to(dtype)
    with torch.no_grad():
        mod.kernel = "torch"
        ref = mod(h, idx, w)
        mod.kernel = "auto"  # interpreter on: auto picks the kernel
        assert mod.uses_triton(h)
        got = mod(h, idx, w)
    assert ref.abs().sum() > 0
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_kernel_choice_without_interpreter(monkeypatch):
    """Plain CPU (no interpreter): auto keeps the torch path; asking for the kernel is an error that says why."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    mod = _experts(4, 16, 16, [4, 4, 3, 3])
    h = torch.randn(3, 16)
    assert not mod.uses_triton(h)
    assert set_kernel(nn.Sequential(mod), "triton") == 1
    with pytest.raises(RuntimeError, match="needs Triton and a CUDA tensor"):
        mod(h, torch.tensor([[0, 1]] * 3), torch.ones(3, 2))
    with pytest.raises(ValueError, match="kernel must be one of"):
        set_kernel(mod, "cuda")


@pytest.mark.gpu
def test_kernel_on_cuda_matches_torch_path():
    if not (torch.cuda.is_available() and triton_pack.triton_installed()):
        pytest.skip("needs CUDA and triton")
    mod = _experts(6, 256, 128, [4, 3, 4, 3, 3, 4]).cuda()
    h = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    idx = torch.randint(0, 6, (64, 2), device="cuda")
    w = torch.rand(64, 2, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        mod.kernel = "torch"
        ref = mod(h, idx, w)
        mod.kernel = "triton"
        got = mod(h, idx, w)
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2)


@needs_triton
def test_auto_falls_back_to_torch_with_a_warning_when_the_kernel_fails(interpret, monkeypatch):
    """A kernel that raises under "auto" is reported once and the torch path answers (same result as "torch");
    under "triton" the error propagates."""
    from moecompress.quant import packed_experts

    monkeypatch.setattr(packed_experts, "_TRITON_FAILED", [])

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image for this GPU")

    monkeypatch.setattr(triton_pack, "packed_grouped_linear", broken)
    mod = _experts(4, 16, 16, [4, 3, 4, 3])
    h = torch.randn(3, 16, generator=torch.Generator().manual_seed(2))
    idx, w = torch.tensor([[0, 1], [2, 3], [1, 2]]), torch.rand(3, 2, generator=torch.Generator().manual_seed(3))
    mod.kernel = "torch"
    ref = mod(h, idx, w)
    mod.kernel = "triton"
    with pytest.raises(RuntimeError, match="no kernel image"):
        mod(h, idx, w)
    mod.kernel = "auto"
    with pytest.warns(RuntimeWarning, match="Triton packed-experts kernel failed"):
        got = mod(h, idx, w)
    assert torch.equal(got, ref)
    assert not mod.uses_triton(h)  # off for the rest of the process
    assert packed_experts._TRITON_FAILED == ["RuntimeError: no kernel image for this GPU"]
