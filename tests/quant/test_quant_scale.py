"""Quantization at scale: Hessians built for a bounded chunk of experts at a time (bit-identical to one chunk),
the chunk from the memory bound, experts split across torchrun ranks (equal to one process), and the least-squares
scale refinement after GPTQ."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moecompress.core import limits
from moecompress.core.experts import routed_forward
from moecompress.quant.gptq import gptq_quantize, prepare_hessian, refine_scales
from moecompress.quant.layer import GPTQOptions, LayerCapture, hessian_chunk, quantize_layer
from moecompress.quant.rtn import dequantize

_ROOT = Path(__file__).resolve().parents[2]


def _capture(seed=0, E=5, H=32, I=16, T=160, batches=2):
    gen = torch.Generator().manual_seed(seed)
    gu = torch.randn(E, 2 * I, H, generator=gen) / H**0.5
    dn = torch.randn(E, H, I, generator=gen) / I**0.5
    cap = LayerCapture(E, H, I)
    for _ in range(batches):
        x = torch.randn(T, H, generator=gen)
        idx = torch.stack([torch.randperm(E, generator=gen)[:2] for _ in range(T)])
        w = torch.softmax(torch.randn(T, 2, generator=gen), -1)
        cap.add_batch(x, idx, w)
        routed_forward(gu, dn, torch.nn.functional.silu, x, idx, w, cap.observer())
    return cap, gu, dn


def _same(a, b):
    (ca, ua, ea), (cb, ub, eb) = a, b
    assert ua == ub and torch.equal(ea, eb)
    for bits in ca:
        for name in ("gate_up_q", "gate_up_s", "down_q", "down_s"):
            assert torch.equal(getattr(ca[bits], name), getattr(cb[bits], name)), (bits, name)


@pytest.mark.parametrize("sequential", [True, False])
def test_chunked_hessians_are_bit_identical_to_one_chunk(sequential, monkeypatch):
    cap, gu, dn = _capture()
    opts = GPTQOptions(sequential=sequential)
    act = torch.nn.functional.silu
    run = lambda chunk: quantize_layer(gu, dn, act, (2, 4), "gptq", cap, 4, torch.float32, opts=opts, chunk=chunk)  # noqa: E731
    whole = run(5)
    sizes = []
    orig = LayerCapture.hessians

    def spy(self, experts, *a, **k):
        sizes.append(len(experts))
        return orig(self, experts, *a, **k)

    monkeypatch.setattr(LayerCapture, "hessians", spy)
    for chunk in (1, 2):
        sizes.clear()
        _same(run(chunk), whole)
        assert max(sizes) == chunk and sum(sizes) == 5  # never more than `chunk` experts' Hessians at once


def test_few_token_experts_get_no_hessian_and_rtn(monkeypatch):
    cap, gu, dn = _capture(E=4, T=40, batches=1)
    built = []
    orig = LayerCapture.hessians
    monkeypatch.setattr(LayerCapture, "hessians", lambda self, ex, *a, **k: built.extend(ex) or orig(self, ex, *a, **k))
    min_tokens = int(cap.counts.min()) + 1
    _, used, _ = quantize_layer(gu, dn, torch.nn.functional.silu, (3,), "gptq", cap, min_tokens, torch.float32)
    few = [e for e in range(4) if cap.counts[e] < min_tokens]
    assert few and sorted(built) == [e for e in range(4) if e not in few]
    assert all(used[e] == f"rtn ({int(cap.counts[e])} tokens)" for e in few)


def test_chunk_follows_the_memory_bound():
    per = 4 * (64 * 64 + 32 * 32)  # H_gu + H_down of one expert, float32
    assert hessian_chunk(100, 64, 32, True, torch.device("cpu"), limit=4 * per * 7) == 7
    assert hessian_chunk(100, 64, 32, True, torch.device("cpu"), limit=1) == 1
    assert hessian_chunk(100, 64, 32, False, torch.device("cpu"), limit=10**12) == 100
    assert hessian_chunk(100, 64, 32, False, torch.device("cpu"), limit=4 * 4 * 64 * 64 * 3) == 3
    try:
        limits.set_memory_limit(4 * per * 2)  # --max-memory wins over the free memory
        assert hessian_chunk(100, 64, 32, True, torch.device("cpu")) == 2
    finally:
        limits.set_memory_limit(None)
    assert 1 <= hessian_chunk(8, 64, 32, True, torch.device("cpu")) <= 8


def test_refined_scales_lower_the_output_error_and_keep_the_codes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 64, generator=g) * torch.rand(64, generator=g) * 3
    h = x.T @ x
    w = torch.randn(24, 64, generator=g)
    for bits in (2, 3, 4):
        q0, s0 = gptq_quantize(w, h, bits, 16, torch.bfloat16)
        q1, s1 = gptq_quantize(w, h, bits, 16, torch.bfloat16, refine=True)
        assert torch.equal(q0, q1) and s1.dtype == torch.bfloat16

        def row_err(s, q0=q0):
            d = w - dequantize(q0, s, 16, torch.float32)
            return ((d @ h) * d).sum(-1)

        e0, e1 = row_err(s0), row_err(s1)
        assert (e1 <= e0).all() and e1.sum() < 0.99 * e0.sum()
    with pytest.raises(ValueError, match="keep=True"):
        gptq_quantize(w, None, 3, 16, prepared=prepare_hessian(h), refine=True)
    # an exact fit: codes times known scales are recovered
    q = torch.randint(-4, 4, (3, 32), generator=g).float()
    s = torch.tensor([[0.5, 0.25], [1.0, 2.0], [0.125, 0.75]])
    wq = q * s.repeat_interleave(16, dim=1)
    got = refine_scales(wq, q.to(torch.int8), torch.ones(3, 2), torch.eye(32) + 0.1, 16)
    torch.testing.assert_close(got, s)


def test_refine_scales_in_row_blocks_equals_all_rows_at_once(monkeypatch):
    """refine_scales works REFINE_BLOCK_ELEMENTS // C rows at a time (its temporaries stay bounded at DeepSeek-V3's
    R 4096 x C 7168): each row's scales do not depend on the others, so the blocks give the all-rows result bit for
    bit, including rows whose refit is rejected (kept scales) and a last, shorter block."""
    from moecompress.quant import gptq

    g = torch.Generator().manual_seed(7)
    rows, cols, gs = 37, 64, 16
    x = torch.randn(256, cols, generator=g) * torch.rand(cols, generator=g)
    h = x.T @ x
    w = torch.randn(rows, cols, generator=g) * 0.02
    q, s = gptq_quantize(w, h, 3, gs, torch.bfloat16)
    q[0] = 0  # a row whose refit is rejected (no positive least-squares scales): it keeps its scales
    whole = refine_scales(w, q, s, h, gs)
    calls = []
    real = gptq._refine_rows
    monkeypatch.setattr(gptq, "_refine_rows", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    monkeypatch.setattr(gptq, "REFINE_BLOCK_ELEMENTS", 5 * cols)  # five rows per block: 8 blocks, the last of 2
    blocked = gptq.refine_scales(w, q, s, h, gs)
    assert calls == [5] * 7 + [2]
    assert torch.equal(whole[0], s[0]) and not torch.equal(whole[1:], s[1:])
    assert torch.equal(blocked, whole)


_RANK_SCRIPT = r"""
import sys, torch
sys.path.insert(0, sys.argv[2])
from test_quant_scale import _capture
from moecompress.core import dist
from moecompress.quant.layer import GPTQOptions, quantize_layer
cap, gu, dn = _capture(seed=1, E=5)
codes, used, err = quantize_layer(gu, dn, torch.nn.functional.silu, (2, 4), "gptq", cap, 4, torch.float32,
                                  opts=GPTQOptions(refine=True), chunk=2)
if dist.is_main():
    torch.save({"codes": {b: vars(q) for b, q in codes.items()}, "used": used, "err": err}, sys.argv[1])
dist.barrier()
dist.shutdown()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two fresh interpreters importing torch: ~25 s on a loaded 2-core machine
def test_two_gloo_ranks_split_experts_and_equal_one_process(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT)
    port, out = _free_port(), tmp_path / "ranks.pt"
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    env.update(OMP_NUM_THREADS="1", MOECOMPRESS_DIST_TIMEOUT="60", PYTHONPATH=str(_ROOT))
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(out), str(Path(__file__).parent)],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
    got = torch.load(out, weights_only=False)
    cap, gu, dn = _capture(seed=1, E=5)
    codes, used, err = quantize_layer(
        gu, dn, torch.nn.functional.silu, (2, 4), "gptq", cap, 4, torch.float32, opts=GPTQOptions(refine=True)
    )
    assert got["used"] == used and torch.equal(got["err"], err)
    for b, q in codes.items():
        for name, t in vars(q).items():
            if isinstance(t, torch.Tensor):
                assert torch.equal(got["codes"][b][name], t), (b, name)


def test_lp_code_cache_is_packed_and_bounded_by_max_memory():
    from moecompress.quant.run import code_cache_bound
    from moecompress.quant.transform import PackedCodes

    cap, gu, dn = _capture(E=3, H=64, I=32)
    codes, _, _ = quantize_layer(gu, dn, torch.nn.functional.silu, (2, 3, 4, 8), "rtn", cap, 4, torch.bfloat16)
    n = 3 * 3 * 32 * 64  # expert weights of the layer
    scales = sum(t.numel() * 2 for t in (codes[2].gate_up_s, codes[2].down_s))
    for b, qe in codes.items():
        p = PackedCodes.of(qe)
        assert p.nbytes == n * b // 8 + scales  # bits / 8 bytes per weight (int8 codes: one byte)
    assert PackedCodes.estimate(n, (2, 3, 4, 8)) == n * 17 // 8
    try:
        limits.set_memory_limit(10**9)
        assert code_cache_bound() == 5 * 10**8
    finally:
        limits.set_memory_limit(None)
    assert (
        code_cache_bound() == limits.host_available_bytes() // 2
        or abs(code_cache_bound() - limits.host_available_bytes() // 2) < 2**28
    )  # available memory moves between the two reads


def test_quantize_takes_max_memory_and_refuses_bad_sizes(tmp_path):
    from typer.testing import CliRunner

    from moecompress.cli.main import app

    res = CliRunner().invoke(app, ["quantize", "--help"])
    assert res.exit_code == 0 and "--max-memory" in res.output
    res = CliRunner().invoke(app, ["quantize", "--bits", "4", "--max-memory", "lots", "-o", str(tmp_path / "q")])
    assert res.exit_code == 2 and "--max-memory" in res.output
    assert not (tmp_path / "q").exists()
    limits.set_memory_limit(None)


@pytest.mark.parametrize("widths", [(2, 3, 4, 8), ((2, 2), (2, 4), (4, 8))])
def test_packed_codes_are_the_int8_codes_packed_expert_by_expert(widths):
    """quantize_layer(packed=True) packs each expert as it is quantized (no int8 copy of the layer): the same
    codes, scales and errors as the int8 path, gate/up packed once per gate/up width."""
    from moecompress.quant.layer import PackedCodes

    cap, gu, dn = _capture(seed=2, E=4, H=64, I=32)
    kw = {"opts": GPTQOptions(), "chunk": 2}
    plain, used, err = quantize_layer(gu, dn, torch.nn.functional.silu, widths, "gptq", cap, 4, torch.bfloat16, **kw)
    packed, used2, err2 = quantize_layer(
        gu, dn, torch.nn.functional.silu, widths, "gptq", cap, 4, torch.bfloat16, packed=True, **kw
    )
    assert used == used2 and torch.equal(err, err2)
    for w in widths:
        want, got = PackedCodes.of(plain[w]), packed[w]
        assert isinstance(got, PackedCodes) and (got.bits, got.dbits) == (want.bits, want.dbits)
        for name in ("gate_up", "gate_up_s", "down", "down_s"):
            assert torch.equal(getattr(got, name), getattr(want, name)), (w, name)
        for e in range(4):
            for a, b in zip(got.dequantized_expert(e), plain[w].dequantized_expert(e), strict=True):
                assert torch.equal(a, b)
    if isinstance(widths[0], tuple):
        assert packed[(2, 2)].gate_up is packed[(2, 4)].gate_up  # gate/up quantized and packed once per width


def test_hessian_chunk_is_bounded_by_the_layer_size():
    from moecompress.quant.layer import HESSIAN_LAYER_FRACTION, hessian_chunk

    E, H, I = 128, 2048, 768
    layer = E * 3 * I * H * 2  # bf16
    per = 4 * H * H
    cpu = torch.device("cpu")
    assert hessian_chunk(E, H, I, False, cpu, limit=10**12) == E  # the memory bound alone: the whole layer
    n = hessian_chunk(E, H, I, False, cpu, limit=10**12, layer_bytes=layer)
    assert n == int(layer * HESSIAN_LAYER_FRACTION // per) and n * per <= layer * HESSIAN_LAYER_FRACTION
    assert hessian_chunk(E, H, I, False, cpu, limit=8 * per, layer_bytes=layer) == 2  # --max-memory still binds
    assert hessian_chunk(E, 7168, 2048, True, cpu, limit=10**12, layer_bytes=10**6) == 1  # at least one expert
