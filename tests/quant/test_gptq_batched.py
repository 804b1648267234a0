"""Batched GPTQ (N experts of one projection per call, quant/gptq.py) against the per-expert functions, and the
quantize path that uses it (quant/layer.py: on CUDA by default, forced here with ``batched=True`` or
``$MOECOMPRESS_GPTQ_BATCHED``)."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny
from safetensors.torch import load_file
from test_quant_scale import _capture as _layer_capture

from moecompress.core.evaluate import evaluate
from moecompress.core.writer import dir_bytes
from moecompress.quant.gptq import (
    gptq_quantize,
    gptq_quantize_batched,
    prepare_hessian,
    prepare_hessian_batched,
)
from moecompress.quant.layer import GPTQ_BATCHED_ENV, GPTQOptions, gptq_batch, quantize_layer
from moecompress.quant.run import run_quantize

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])]  # fmt: skip


def _problem(n, rows, cols, seed=0, dead=0, shifts=()):
    """``w [n, R, C]`` and Hessians ``[n, C, C]`` of random inputs; ``dead`` inputs never fire; ``shifts``: (k, s)
    make matrix k indefinite by ``s`` x its mean diagonal, so it needs more damping than the first try."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, rows, cols, generator=gen)
    x = torch.randn(n, 3 * cols, cols, generator=gen) * torch.rand(n, 1, cols, generator=gen).add(0.1)
    x[:, :, :dead] = 0
    h = x.transpose(1, 2) @ x
    for k, s in shifts:
        h[k] -= s * h[k].diagonal().mean() * torch.eye(cols)
    return w, h


def _per_expert(w, h, bits, g, actorder, refine, clip="hmse"):
    out = []
    for k in range(w.shape[0]):
        ph = prepare_hessian(h[k], 0.01, actorder, keep=refine)
        out.append(gptq_quantize(w[k], None, bits, g, prepared=ph, actorder=actorder, clip=clip, refine=refine))
    return torch.stack([q for q, _ in out]), torch.stack([s for _, s in out])


def _agree(a, b):
    (qa, sa), (qb, sb) = a, b
    assert qa.shape == qb.shape and sa.shape == sb.shape
    assert (qa.cpu() == qb.cpu()).float().mean() >= 0.999
    torch.testing.assert_close(sb.float().cpu(), sa.float().cpu(), rtol=1e-2, atol=1e-6)


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize(
    "n,bits,g,actorder,refine,dead,clip",
    [
        (1, 4, None, True, True, 0, "hmse"),
        (3, 4, None, True, True, 3, "hmse"),
        (4, 3, 32, True, False, 0, "mse"),
        (3, 3, 32, False, True, 2, "hmse"),
        (5, 4, 64, False, False, 0, "none"),
    ],
)
def test_batched_equals_the_per_expert_loop(dev, n, bits, g, actorder, refine, dead, clip):
    w, h = _problem(n, 24, 128, seed=n + bits, dead=dead)
    w, h = w.to(dev), h.to(dev)
    ref = _per_expert(w, h, bits, g, actorder, refine, clip)  # on the same device
    ph = prepare_hessian_batched(h, 0.01, actorder, keep=refine, step=2)
    got = gptq_quantize_batched(w, ph, bits, g, actorder=actorder, clip=clip, refine=refine)
    assert got[0].device == w.device and got[1].device == w.device and ph.hinv.device == w.device
    _agree(got, ref)
    if dead:  # dead inputs are zeroed, as per expert
        assert (got[0][:, :, :dead] == 0).all()
    if dev == "cpu":  # the same products, batched: bit for bit on the CPU
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("step", [None, 1, 2])
def test_damping_retries_only_the_matrices_that_need_them(dev, step):
    # matrix 1 needs 10x the damping, matrix 2 100x; 0 and 3 factorize at the first try
    w, h = _problem(4, 16, 96, seed=7, shifts=((1, 0.05), (2, 0.5)))
    first = [int(torch.linalg.cholesky_ex(m + 0.01 * m.diagonal().mean() * torch.eye(96))[1]) for m in h]
    assert [f != 0 for f in first] == [False, True, True, False]  # 1 and 2 fail the first damping
    assert int(torch.linalg.cholesky_ex(h[2] + 0.1 * h[2].diagonal().mean() * torch.eye(96))[1]) != 0  # 2 also 10x
    ref = _per_expert(w.to(dev), h.to(dev), 4, 32, True, True)
    ph = prepare_hessian_batched(h.to(dev), 0.01, True, keep=True, step=step)
    for k in range(4):
        torch.testing.assert_close(ph.at(k).hinv, prepare_hessian(h[k].to(dev), 0.01, True).hinv, rtol=1e-4, atol=1e-5)
    _agree(gptq_quantize_batched(w.to(dev), ph, 4, 32, refine=True), ref)
    h[3] -= 5 * h[3].diagonal().mean() * torch.eye(96)  # beyond the largest damping
    with pytest.raises(ValueError, match="not positive definite"):
        prepare_hessian_batched(h.to(dev), 0.01, True, step=step)


def test_singular_hessian_with_dead_inputs_is_damped_until_it_factorizes(dev="cpu"):
    # expert 1 saw 20 tokens for 96 inputs (4 never fire): with damping 1e-8 its Cholesky fails twice (CPU float32;
    # on a GPU, where the factorization differs, the damping a singular matrix needs may differ between kernels)
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(3, 16, 96, generator=gen)
    xs = [torch.randn(t, 96, generator=gen) for t in (300, 20, 300)]
    xs[1][:, :4] = 0
    h = torch.stack([x.T @ x for x in xs])
    h1 = h[1].clone()
    h1.diagonal()[:4] = 1.0  # as prepared: dead inputs' diagonal 1
    assert int(torch.linalg.cholesky_ex(h1 + 1e-8 * h1.diagonal().mean() * torch.eye(96))[1]) != 0
    ref = _per_expert_damp(w.to(dev), h.to(dev), 1e-8)
    got = gptq_quantize_batched(w.to(dev), prepare_hessian_batched(h.to(dev), 1e-8, True, keep=True), 4, refine=True)
    _agree(got, ref)
    assert (got[0][1, :, :4] == 0).all() and (got[0][1] != 0).any()


def _per_expert_damp(w, h, damp):
    out = [gptq_quantize(w[k], None, 4, prepared=prepare_hessian(h[k], damp, True, keep=True), refine=True)
           for k in range(w.shape[0])]  # fmt: skip
    return torch.stack([q for q, _ in out]), torch.stack([s for _, s in out])


def test_batched_refusals():
    w, h = _problem(2, 8, 64)
    ph = prepare_hessian_batched(h, actorder=True)
    with pytest.raises(ValueError, match="batch of 3"):
        gptq_quantize_batched(torch.randn(3, 8, 64), ph, 4)
    with pytest.raises(ValueError, match="actorder"):
        gptq_quantize_batched(w, ph, 4, actorder=False)
    with pytest.raises(ValueError, match="keep=True"):
        gptq_quantize_batched(w, ph, 4, refine=True)
    with pytest.raises(ValueError, match="clip"):
        gptq_quantize_batched(w, ph, 4, clip="max")


def _capture(E=6, H=64, I=32, T=200, seed=0):
    return _layer_capture(seed, E, H, I, T)


@pytest.mark.parametrize("sequential", [True, False])
def test_quantize_layer_batched_equals_per_expert(sequential, monkeypatch):
    cap, gu, dn = _capture()
    act = torch.nn.functional.silu
    opts = GPTQOptions(sequential=sequential)
    min_tokens = int(cap.counts.sort().values[1]) + 1  # some experts take RTN
    widths = (3, (2, 4), 4)
    calls = []
    orig = gptq_quantize_batched

    def spy(w, *a, **k):
        calls.append(w.shape[0])
        return orig(w, *a, **k)

    monkeypatch.setattr("moecompress.quant.layer.gptq_quantize_batched", spy)
    a = quantize_layer(gu, dn, act, widths, "gptq", cap, min_tokens, torch.float32, opts=opts, batched=False)
    assert not calls
    n_gptq = a[1].count("gptq")
    assert 1 < n_gptq < 6
    for chunk in (6, 4):  # a given chunk is also the batch
        calls.clear()
        b = quantize_layer(gu, dn, act, widths, "gptq", cap, min_tokens, torch.float32, opts=opts, chunk=chunk,
                           batched=True)  # fmt: skip
        assert max(calls) <= chunk and sum(calls) == n_gptq * (3 + 3)  # 3 gate/up + 3 down widths
        assert chunk < 6 or calls == [n_gptq] * 6  # one call per projection and width for the whole layer
        assert a[1] == b[1]
        torch.testing.assert_close(b[2], a[2], rtol=1e-4, atol=1e-9)
        for wd in widths:
            for name in ("gate_up_q", "gate_up_s", "down_q", "down_s"):
                assert torch.equal(getattr(a[0][wd], name), getattr(b[0][wd], name)), (wd, name)
    # a bit plan's write: each expert at its own width, experts of one width batched together
    plan = [widths[e % 3] for e in range(6)]
    c = quantize_layer(gu, dn, act, widths, "gptq", cap, min_tokens, torch.float32, opts=opts, expert_widths=plan,
                       chunk=6, batched=False)  # fmt: skip
    d = quantize_layer(gu, dn, act, widths, "gptq", cap, min_tokens, torch.float32, opts=opts, expert_widths=plan,
                       chunk=6, batched=True, packed=True)  # fmt: skip
    for e in range(6):
        for which in (0, 1):
            ref = c[0][plan[e]].dequantized_expert(e)[which]
            assert torch.equal(d[0][plan[e]].weight(e, which), ref), (e, which)


def test_batch_size_keeps_the_host_peak_and_uses_the_chunk_on_cuda(monkeypatch):
    cpu = torch.device("cpu")
    # E128 at H 512; DeepSeek-V3's dims (the column block of 3 would be 11 MiB); the Qwen3-30B layer (3 MiB block)
    for H, I, chunk0, want in ((512, 256, 24, 3), (7168, 2048, 13, 1), (2048, 768, 18, 3)):
        layer = 128 * 3 * H * I * 2
        per, work = 4 * H * H, 4 * (H * H + 2 * I * I + 12 * I * H)
        assert gptq_batch(128, H, I, False, cpu, limit=10**12, layer_bytes=layer) == (want, want)
        assert want * (per + work) <= chunk0 * per + work  # never above the per-expert path's chunk + one expert
        assert gptq_batch(128, H, I, False, cpu, limit=1, layer_bytes=layer) == (1, 1)
    cuda = torch.device("cuda")
    assert gptq_batch(128, H, I, False, cuda, limit=10**12, layer_bytes=layer) == (18, 6)  # half the layer
    assert gptq_batch(128, H, I, False, cuda, limit=10**12) == (128, 128)  # no layer given: the memory limit only
    assert gptq_batch(128, H, I, False, cuda, limit=4 * 5 * work, layer_bytes=layer) == (18, 5)  # --max-memory binds
    from moecompress.quant.layer import gptq_batched

    monkeypatch.delenv(GPTQ_BATCHED_ENV, raising=False)
    assert gptq_batched(cuda) is None and gptq_batched(cpu) is None  # by the batch size (CPU), always (CUDA)
    monkeypatch.setenv(GPTQ_BATCHED_ENV, "1")
    assert gptq_batched(cpu) is True
    monkeypatch.setenv(GPTQ_BATCHED_ENV, "0")
    assert gptq_batched(cuda) is False


def test_cpu_default_batches_only_where_a_batch_holds_several_experts(monkeypatch):
    cap, gu, dn = _capture()
    calls = []

    def spy(w, *a, **k):
        calls.append(w.shape[0])
        return gptq_quantize_batched(w, *a, **k)

    monkeypatch.setattr("moecompress.quant.layer.gptq_quantize_batched", spy)
    monkeypatch.delenv(GPTQ_BATCHED_ENV, raising=False)
    run = lambda: quantize_layer(gu, dn, torch.nn.functional.silu, (4,), "gptq", cap, 4, torch.float32)  # noqa: E731
    for batch, want in ((1, []), (3, [3, 3, 3, 3])):
        calls.clear()
        monkeypatch.setattr("moecompress.quant.layer.gptq_batch", lambda E, *a, n=batch, **k: (n, n))
        run()
        assert calls == want
    calls.clear()
    monkeypatch.setenv(GPTQ_BATCHED_ENV, "1")  # forced: batched even with one expert per call
    monkeypatch.setattr("moecompress.quant.layer.gptq_batch", lambda E, *a, **k: (1, 1))
    run()
    assert calls == [1] * 12


def test_quantize_end_to_end_batched_equals_per_expert(tmp_path, tokenizer_dir, monkeypatch):
    model = build_tiny("qwen3_moe", tmp_path / "m", tokenizer_dir)
    kw = dict(bits=3, plan="uniform", method="gptq", other_bits=8, samples=4, seq_len=32, batch_size=4, min_tokens=4)
    outs = {}
    for flag in ("0", "1"):
        monkeypatch.setenv(GPTQ_BATCHED_ENV, flag)
        monkeypatch.setattr("moecompress.quant.layer.gptq_batch", lambda E, *a, **k: (E, E))  # whole layers
        outs[flag] = tmp_path / f"q{flag}"
        run_quantize(model, outs[flag], **kw)
    kl = {f: evaluate(o, model, seq_len=32, max_windows=2)["kl_to_base"] for f, o in outs.items()}
    assert dir_bytes(outs["0"]) == dir_bytes(outs["1"])
    tensors = {f: [load_file(p) for p in sorted(o.glob("*.safetensors"))] for f, o in outs.items()}
    for a, b in zip(tensors["0"], tensors["1"], strict=True):  # on the CPU bit for bit
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert kl["1"] == pytest.approx(kl["0"], rel=1e-3, abs=1e-7)
