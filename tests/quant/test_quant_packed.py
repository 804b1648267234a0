"""Routed experts kept packed and dequantized on the fly (PackedExperts) give the same numbers as the dense loader."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny, write_with_transform

from moecompress.quant.load import load_quantized
from moecompress.quant.packed_experts import PackedExperts, module_nbytes
from moecompress.quant.run import run_quantize

KW = dict(samples=4, seq_len=32, batch_size=4, min_tokens=4)
IDS = torch.randint(0, 300, (3, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def qwen(tmp_path_factory, tokenizer_dir):
    return build_tiny("qwen3_moe", tmp_path_factory.mktemp("m") / "qwen3", tokenizer_dir)


@pytest.fixture(scope="module")
def outputs(qwen, tmp_path_factory):
    """Quantized folders: uniform 2/3/4/8 bits (RTN) and a per-expert mix of widths (one width per expert: the
    packed layout; per-expert LP plans with per-projection options load dense, tests/quant/test_quant_options.py)."""
    from moecompress.core.checkpoint import Checkpoint
    from moecompress.quant.transform import QuantTransform

    root = tmp_path_factory.mktemp("q")
    out = {}
    for b in (2, 3, 4, 8):
        out[b] = root / f"u{b}"
        run_quantize(qwen, out[b], bits=b, plan="uniform", method="rtn", other_bits=8, **KW)
    out["mixed"] = root / "mixed"
    ck = Checkpoint(qwen)
    widths = {l: [(2, 3, 4, 8, 3, 2), (4, 4, 2, 3, 8, 3), (3, 2, 3, 4, 4, 8)][i] for i, l in enumerate(ck.moe_layers)}
    t = QuantTransform({l: list(w) for l, w in widths.items()}, "rtn", other_bits=8, propagate=False)
    write_with_transform(qwen, t, out["mixed"])
    return out, {str(l): list(w) for l, w in widths.items()}


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _experts(model, layer):
    return model.model.layers[layer].mlp.experts


@pytest.mark.parametrize("which", [4, 3, 2, 8, "mixed"])
def test_packed_equals_dense(outputs, which):
    folders, plan = outputs
    dense = load_quantized(folders[which], packed=False)
    packed = load_quantized(folders[which], packed=True)
    for l in range(3):
        ex = _experts(packed, l)
        assert isinstance(ex, PackedExperts)
        gu, dn = ex.dense(torch.float32)
        assert torch.equal(gu, _experts(dense, l).gate_up_proj)  # dequantized on the fly == dequantized at load
        assert torch.equal(dn, _experts(dense, l).down_proj)
        if which == "mixed":
            assert ex.bits == plan[str(l)]
        else:
            assert ex.bits == [which] * 6
        # router and attention are the dense loader's tensors
        assert torch.equal(packed.model.layers[l].mlp.gate.weight, dense.model.layers[l].mlp.gate.weight)
        assert torch.equal(
            packed.model.layers[l].self_attn.q_proj.weight, dense.model.layers[l].self_attn.q_proj.weight
        )
    if which == "mixed":
        assert len({b for l in range(3) for b in _experts(packed, l).bits}) > 1  # a real per-expert mix
    assert torch.equal(_logits(packed), _logits(dense))
    # resident bytes: routed experts at their packed size (int32 codes + bf16 scales) instead of float32
    saved = module_nbytes(dense) - module_nbytes(packed)
    E, H, I = 6, 32, 24
    bits = [b for l in range(3) for b in _experts(packed, l).bits]
    packed_bytes = sum(2 * I * -(-H * b // 32) * 4 + H * -(-I * b // 32) * 4 for b in bits)
    scale_bytes = sum(module_nbytes(_experts(packed, l)) for l in range(3)) - packed_bytes
    assert scale_bytes > 0
    assert saved == 3 * E * 3 * H * I * 4 - packed_bytes - scale_bytes


def test_default_is_dense_on_cpu_and_bf16_matches(outputs):
    folders, _ = outputs
    assert not isinstance(_experts(load_quantized(folders[4]), 0), PackedExperts)
    dense = load_quantized(folders[3], dtype=torch.bfloat16, packed=False)
    packed = load_quantized(folders[3], dtype=torch.bfloat16, packed=True)
    gu, _ = _experts(packed, 1).dense(torch.bfloat16)
    assert torch.equal(gu, _experts(dense, 1).gate_up_proj)
    assert torch.equal(_logits(packed), _logits(dense))


def test_forward_matches_stock_experts_with_unhit_experts(outputs):
    """Same loop semantics as transformers' experts: a token batch that leaves experts unhit, weights applied."""
    folders, _ = outputs
    dense = load_quantized(folders[4], packed=False)
    packed = load_quantized(folders[4], packed=True)
    h = torch.randn(5, 32, generator=torch.Generator().manual_seed(3))
    idx = torch.tensor([[0, 2], [2, 0], [0, 5], [5, 2], [2, 5]])  # experts 1, 3, 4 never hit
    w = torch.rand(5, 2, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = _experts(dense, 2)(h, idx, w)
        got = _experts(packed, 2)(h, idx, w)
    assert torch.equal(got, ref)
    assert ref.abs().sum() > 0


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_other_families_packed_equals_dense(family, tmp_path, tokenizer_dir):
    """Mixtral (block_sparse_moe on disk, w1/w3/w2) and DeepSeek-V3 (dense first layer, shared experts)."""
    src = build_tiny(family, tmp_path / family, tokenizer_dir)
    out = tmp_path / "q"
    run_quantize(src, out, bits=4, plan="uniform", method="rtn", other_bits=8, **KW)
    dense = load_quantized(out, packed=False)
    packed = load_quantized(out, packed=True)
    kinds = [
        type(layer.mlp.experts).__name__ if hasattr(layer.mlp, "experts") else "dense" for layer in packed.model.layers
    ]
    assert kinds.count("PackedExperts") == (2 if family == "deepseek_v3" else 3)
    assert torch.equal(_logits(packed), _logits(dense))


@pytest.mark.gpu
def test_cuda_packed_equals_cpu_dense(outputs):
    """On CUDA the unpacking runs on the GPU: the dequantized experts are bit-identical to the CPU dense path and
    the logits agree to float32 matmul tolerance (different GEMM kernels)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    folders, _ = outputs
    for which in (4, 3, 2, "mixed"):
        cpu = load_quantized(folders[which], "cpu", packed=False)
        gpu = load_quantized(folders[which], "cuda")  # packed by default on CUDA
        for l in range(3):
            ex = _experts(gpu, l)
            assert isinstance(ex, PackedExperts)
            assert all(b.device.type == "cuda" for b in ex.buffers())
            gu, dn = ex.dense(torch.float32)
            assert gu.device.type == "cuda"
            assert torch.equal(gu.cpu(), _experts(cpu, l).gate_up_proj)
            assert torch.equal(dn.cpu(), _experts(cpu, l).down_proj)
        torch.testing.assert_close(_logits(gpu, IDS.cuda()).cpu(), _logits(cpu), rtol=1e-4, atol=1e-4)


def test_eval_counts_packed_experts_as_their_dense_size():
    from torch import nn

    from moecompress.core.evaluate import count_params
    from moecompress.quant.packed_experts import PackedExperts

    packed = PackedExperts(4, 32, 24, nn.functional.silu, [4, 4, 3, 2], 32, 24)
    model = nn.Sequential(nn.Linear(32, 32, bias=False), packed)
    assert count_params(model) == 32 * 32 + 3 * 4 * 24 * 32
