"""Pure tensor quantizers: RTN, GPTQ, packing (against compressed-tensors' own decompressor), fused experts, NF4."""

from __future__ import annotations

import pytest
import torch

from moecompress.quant.gptq import gptq_quantize, hessian_from_inputs, prepare_hessian
from moecompress.quant.pack import pack_int32, packed_cols, unpack_int32
from moecompress.quant.rtn import (
    dequantize,
    group_size_for,
    qrange,
    quantized_nbytes,
    rtn_quantize,
)

BITS = (2, 3, 4, 8)


def test_group_size_rule():
    assert group_size_for(256) == 128
    assert group_size_for(128) == 128
    assert group_size_for(192) == 64
    assert group_size_for(96) == 32
    assert group_size_for(48) == 16
    assert group_size_for(40) == 40  # no 16..128 divisor: one group per row


@pytest.mark.parametrize("bits", BITS)
def test_rtn_codes_in_range_and_error_falls_with_bits(bits):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 256, generator=g).to(torch.bfloat16)
    q, s = rtn_quantize(w, bits)
    qmin, qmax = qrange(bits)
    assert q.dtype == torch.int8 and s.shape == (32, 2) and s.dtype == torch.bfloat16
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    rel = ((dequantize(q, s, 128, torch.float32) - w.float()).pow(2).sum() / w.float().pow(2).sum()).item()
    bound = {2: 0.2, 3: 0.06, 4: 0.015, 8: 1e-4}[bits]
    assert rel < bound


def test_rtn_error_monotone_in_bits():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    errs = []
    for b in BITS:
        q, s = rtn_quantize(w, b, scale_dtype=torch.float32)
        errs.append((dequantize(q, s, 128) - w).pow(2).sum().item())
    assert errs == sorted(errs, reverse=True)


def test_fused_3d_equals_per_expert_loop():
    w = torch.randn(5, 24, 256, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)  # [E, I, H]
    for b in (3, 4):
        q, s = rtn_quantize(w, b)
        for e in range(w.shape[0]):
            qe, se = rtn_quantize(w[e], b)
            assert torch.equal(q[e], qe) and torch.equal(s[e], se)
        packed = pack_int32(q, b)
        for e in range(w.shape[0]):
            assert torch.equal(packed[e], pack_int32(q[e], b))
        assert torch.equal(unpack_int32(packed, b, 256), q)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("cols", [256, 128, 100, 7])
def test_pack_roundtrip_and_matches_compressed_tensors(bits, cols):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    qmin, qmax = qrange(bits)
    q = torch.randint(qmin, qmax + 1, (6, cols), generator=torch.Generator().manual_seed(bits), dtype=torch.int8)
    q[0, : min(cols, 4)] = torch.tensor([qmin, qmax, 0, -1][: min(cols, 4)], dtype=torch.int8)
    packed = pack_int32(q, bits)
    assert packed.dtype == torch.int32 and packed.shape == (6, packed_cols(cols, bits))
    assert torch.equal(unpack_int32(packed, bits, cols), q)
    assert torch.equal(packed, pack_to_int32(q, bits))  # their packer, bit for bit
    assert torch.equal(unpack_from_int32(packed, bits, torch.Size((6, cols))), q)


@pytest.mark.parametrize("bits", BITS)
def test_compressed_tensors_decompressor_reads_our_layout(bits):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    q, s = rtn_quantize(w, bits)
    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=128),
    )
    sd = {"weight_packed": pack_int32(q, bits), "weight_scale": s, "weight_shape": torch.tensor([16, 256])}
    theirs = PackedQuantizationCompressor.decompress(sd, scheme)["weight"]
    ours = dequantize(q, s, 128)
    assert theirs.dtype == ours.dtype == torch.bfloat16
    assert torch.equal(theirs, ours)


def _out_err(x, w, wq):
    return (x @ w.T - x @ wq.T).pow(2).sum().item()


@pytest.mark.parametrize("bits", (2, 3, 4))
def test_gptq_beats_rtn_on_calibration_inputs(bits):
    gen = torch.Generator().manual_seed(4)
    cols = 256
    mix = torch.randn(cols, cols, generator=gen) / cols**0.5  # correlated inputs, as in real activations
    x = torch.randn(2048, cols, generator=gen) @ mix + 0.1 * torch.randn(2048, cols, generator=gen)
    w = torch.randn(48, cols, generator=gen)
    h = hessian_from_inputs(x)
    qg, sg = gptq_quantize(w, h, bits, scale_dtype=torch.float32)
    qr, sr = rtn_quantize(w, bits, scale_dtype=torch.float32)
    qmin, qmax = qrange(bits)
    assert int(qg.min()) >= qmin and int(qg.max()) <= qmax
    e_gptq = _out_err(x, w, dequantize(qg, sg, 128))
    e_rtn = _out_err(x, w, dequantize(qr, sr, 128))
    assert e_gptq <= e_rtn
    assert e_gptq < 0.8 * e_rtn  # and by a clear margin on correlated inputs


def test_gptq_group_larger_than_block_and_dead_inputs():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(512, 40, generator=gen)
    x[:, 3] = 0.0  # a dead input channel
    w = torch.randn(8, 40, generator=gen)
    q, s = gptq_quantize(w, hessian_from_inputs(x), 4, block_size=16, scale_dtype=torch.float32)
    assert s.shape == (8, 1)  # width 40 has no 16..128 divisor: per-row group
    wq = dequantize(q, s, 40)
    assert torch.all(wq[:, 3] == 0)
    qr, sr = rtn_quantize(w, 4, scale_dtype=torch.float32)
    assert _out_err(x, w, wq) <= _out_err(x, w, dequantize(qr, sr, 40))


def _varying_inputs(seed, cols=256, rows=4096):
    """Correlated inputs whose per-channel scale spans ~2 orders of magnitude (a strongly varying H diagonal)."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=gen) / cols**0.5
    scale = torch.exp(1.5 * torch.randn(cols, generator=gen))
    return (torch.randn(rows, cols, generator=gen) @ mix + 0.1 * torch.randn(rows, cols, generator=gen)) * scale


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
def test_actorder_gptq_keeps_the_plain_group_layout_and_beats_rtn(bits):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    x = _varying_inputs(7)
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    q, s = gptq_quantize(w, hessian_from_inputs(x), bits, actorder=True)
    assert q.shape == (32, 256) and s.shape == (32, 2) and s.dtype == torch.bfloat16
    qmin, qmax = qrange(bits)
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=128),
    )
    sd = {"weight_packed": pack_int32(q, bits), "weight_scale": s, "weight_shape": torch.tensor([32, 256])}
    theirs = PackedQuantizationCompressor.decompress(sd, scheme)["weight"]  # no g_idx: plain groups
    assert torch.equal(theirs, dequantize(q, s, 128))
    qr, sr = rtn_quantize(w, bits)
    assert _out_err(x, w.float(), theirs.float()) <= _out_err(x, w.float(), dequantize(qr, sr, 128).float())


@pytest.mark.parametrize("bits", (2, 3, 4))
def test_actorder_beats_natural_order_on_a_strongly_varying_diagonal(bits):
    x = _varying_inputs(9)
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(10))
    h = hessian_from_inputs(x)
    errs = {}
    for ao in (False, True):
        q, s = gptq_quantize(w, h, bits, scale_dtype=torch.float32, actorder=ao)
        errs[ao] = _out_err(x, w, dequantize(q, s, 128))
    assert errs[True] < 0.9 * errs[False]
    # the Hessian-diagonal-weighted scale search is at least as good on the same inputs
    q, s = gptq_quantize(w, h, bits, scale_dtype=torch.float32, actorder=True, clip="hmse")
    assert _out_err(x, w, dequantize(q, s, 128)) <= errs[True] * 1.02


def test_prepared_hessian_is_reused_across_widths_with_identical_results():
    x = _varying_inputs(11, cols=128, rows=1024)
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(12))
    h = hessian_from_inputs(x)
    ph = prepare_hessian(h)
    assert torch.equal(ph.perm, torch.argsort(torch.diag(h), descending=True, stable=True))
    for b in (2, 3, 4, 8):
        a = gptq_quantize(w, h, b, scale_dtype=torch.float32)
        c = gptq_quantize(w, None, b, scale_dtype=torch.float32, prepared=ph)
        assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])
    with pytest.raises(ValueError, match="actorder"):
        gptq_quantize(w, None, 4, actorder=False, prepared=ph)


def test_quantized_nbytes_matches_tensors():
    w = torch.randn(24, 256)
    for b in BITS:
        q, s = rtn_quantize(w, b)
        real = pack_int32(q, b).numel() * 4 + s.numel() * 2 + torch.tensor([24, 256]).numel() * 8
        assert quantized_nbytes(24, 256, b, 128) == real


def test_nf4_expert_slices_through_bitsandbytes():
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbf

    from moecompress.quant.nf4 import nf4_dequantize_experts, nf4_nbytes, nf4_quantize_experts

    w = torch.randn(3, 64, 128, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)  # [E, I, H]
    parts = nf4_quantize_experts(w)
    deq = nf4_dequantize_experts(parts)
    assert deq.shape == w.shape
    for e in range(3):  # per-expert loop through bitsandbytes directly gives the same weights
        p, st = bnbf.quantize_4bit(w[e].contiguous(), blocksize=64, quant_type="nf4")
        assert torch.equal(bnbf.dequantize_4bit(p, st), deq[e])
    rel = ((deq.float() - w.float()).pow(2).sum() / w.float().pow(2).sum()).item()
    assert rel < 0.02
    assert nf4_nbytes(parts) < w.numel() * 2 / 3  # well under a third of bf16


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_in_row_blocks_equals_one_block(bits, monkeypatch):
    """pack_int32 / unpack_int32 work a block of rows at a time (bounded int64 temporaries): the same words."""
    from moecompress.quant import pack

    q = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (3, 7, 96), dtype=torch.int8)
    whole = pack.pack_int32(q, bits)
    monkeypatch.setattr(pack, "BLOCK_ELEMENTS", 200)  # two rows of 96 codes per block
    assert torch.equal(pack.pack_int32(q, bits), whole)
    assert torch.equal(pack.unpack_int32(whole, bits, 96), q)


def _prepare_reference(h, damp, actorder):
    """prepare_hessian as first written: I * damping added to a copy, two gathers for the order."""
    h = h.float().clone()
    diag = torch.diag(h).clone()
    dead = diag == 0
    h[dead, dead] = 1.0
    perm = torch.argsort(torch.diag(h), descending=True, stable=True) if actorder else None
    if actorder:
        h = h[perm][:, perm]
    mean = torch.diag(h).mean().clamp_min(1e-8)
    for mult in (1.0, 10.0, 100.0, 1000.0):
        chol, info = torch.linalg.cholesky_ex(h + torch.eye(h.shape[0]) * (damp * mult * mean))
        if int(info) == 0:
            inv, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
            if int(info) == 0:
                return inv, perm
    raise AssertionError("not positive definite")


@pytest.mark.parametrize("actorder", [True, False])
@pytest.mark.parametrize("indefinite", [False, True])
def test_prepare_hessian_in_place_equals_the_copying_factorization(actorder, indefinite):
    """Damping the diagonal in place and one gather for the order (fewer [C, C] copies) give the same factor."""
    x = torch.randn(40, 24, generator=torch.Generator().manual_seed(3))
    x[:, 5] = 0  # a dead input
    h = x.T @ x
    if indefinite:  # needs more than the first damping (0.01 x mean diagonal), less than 10x that
        live = [i for i in range(24) if i != 5]
        h -= (torch.linalg.eigvalsh(h[live][:, live]).min() + 0.03 * torch.diag(h).mean()) * torch.eye(24)
        h[5, 5] = 0
        m = torch.diag(h).sum() / 23
        assert int(torch.linalg.cholesky_ex(h + torch.eye(24) * 0.01 * m)[1]) != 0
    want, perm = _prepare_reference(h, 0.01, actorder)
    for inplace in (False, True):
        src = h.clone()
        ph = prepare_hessian(src, 0.01, actorder, keep=True, inplace=inplace)
        assert torch.equal(ph.hinv, want) and (perm is None or torch.equal(ph.perm, perm))
        kept = h.clone()
        kept[5, 5] = 1.0
        assert torch.equal(ph.h, kept)  # the kept Hessian is undamped, original order
        assert (ph.h is src) == inplace and torch.equal(src, kept if inplace else h)


def test_scale_search_in_row_blocks_equals_one_block(monkeypatch):
    """compute_scales works a block of rows at a time (bounded temporaries): the same scales."""
    from moecompress.quant import rtn

    w = torch.randn(3, 10, 64, generator=torch.Generator().manual_seed(4))
    cw = torch.rand(64)
    whole = [rtn.compute_scales(w, b, 16, torch.bfloat16, col_weight=c) for b in (2, 4) for c in (None, cw)]
    monkeypatch.setattr(rtn, "SCALE_BLOCK_ELEMENTS", 150)  # two rows of 64 per block
    blocked = [rtn.compute_scales(w, b, 16, torch.bfloat16, col_weight=c) for b in (2, 4) for c in (None, cw)]
    assert all(torch.equal(a, b) for a, b in zip(whole, blocked, strict=True))
    assert whole[0].shape == (3, 10, 4)


def test_codes_and_dequantized_weights_in_row_blocks_equal_the_whole_matrix_formula(monkeypatch):
    """quantize_with_scales and dequantize work a block of rows at a time (bounded float32 temporaries): the same
    codes and weights as the one-step formulas, for 2-D and batched [n, R, C] inputs and any output dtype."""
    from moecompress.quant import rtn

    g = torch.Generator().manual_seed(5)
    w = torch.randn(3, 10, 64, generator=g).to(torch.bfloat16)
    s = rtn.compute_scales(w, 4, 16, torch.bfloat16)
    q_ref = torch.clamp(torch.round(w.float() / s.float().repeat_interleave(16, dim=-1)), -8, 7).to(torch.int8)
    monkeypatch.setattr(rtn, "SCALE_BLOCK_ELEMENTS", 150)  # two rows of 64 per block, a short last block
    for ww, ss, qr in ((w, s, q_ref), (w[1], s[1], q_ref[1])):
        q = rtn.quantize_with_scales(ww, ss, 4, 16)
        assert q.dtype == torch.int8 and torch.equal(q, qr)
        for dt in (None, torch.float32, torch.float16):
            want = (qr.float() * ss.float().repeat_interleave(16, dim=-1)).to(dt or ss.dtype)
            got = rtn.dequantize(q, ss, 16, dt)
            assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.parametrize("actorder", [True, False])
def test_a_retry_after_the_inverse_fails_rebuilds_the_hessian_bit_for_bit(monkeypatch, actorder):
    """With a kept Hessian the ordered copy is let go once its factor exists; when the inverse's factorization
    fails, it is rebuilt and damped more: the same factor as holding it throughout."""
    from moecompress.quant import gptq

    x = torch.randn(40, 24, generator=torch.Generator().manual_seed(6))
    h = x.T @ x
    real = torch.linalg.cholesky_ex
    results = []
    for keep in (True, False):
        calls = {"upper": 0}

        def flaky(a, upper=False, calls=calls, **kw):
            out, info = real(a, upper=upper, **kw)
            if upper:
                calls["upper"] += 1
                if calls["upper"] == 1:  # the first inverse is "not positive definite": damp 10x and retry
                    return out, torch.ones_like(info)
            return out, info

        monkeypatch.setattr(torch.linalg, "cholesky_ex", flaky)
        ph = gptq.prepare_hessian(h.clone(), 0.01, actorder, keep=keep, inplace=True)
        monkeypatch.setattr(torch.linalg, "cholesky_ex", real)
        assert calls["upper"] == 2
        results.append(ph.hinv)
    assert torch.equal(results[0], results[1])
    want, _ = _prepare_reference(h, 0.1, actorder)  # the retry's damping: 10 x 0.01
    assert torch.equal(results[0], want)


@pytest.mark.parametrize("dead", [False, True], ids=["live", "dead-input"])
def test_gptq_leaves_a_float32_weight_untouched(dead):
    """Without dead inputs GPTQ reads a float32 weight itself (no working copy of it beside the permuted one): the
    caller's tensor is never written, and the codes equal those of a copy's."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(64, 32, generator=g)
    if dead:
        x[:, 3] = 0
    w = torch.randn(12, 32, generator=g)
    before = w.clone()
    ph = prepare_hessian(x.T @ x, 0.03, True, keep=True)
    q, s = gptq_quantize(w, None, 4, 16, prepared=ph, refine=True)
    assert torch.equal(w, before)
    q2, s2 = gptq_quantize(w.clone(), None, 4, 16, prepared=ph, refine=True)
    assert torch.equal(q, q2) and torch.equal(s, s2)
