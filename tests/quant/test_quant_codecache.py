"""The LP measuring pass's kept codes spilled to one file per layer (quant/codecache.py) when all layers' codes
pass the cache bound but one layer's fit: the write pass reads each layer back and writes the same bytes as the
in-memory cache."""

from __future__ import annotations

import hashlib
import tempfile

import pytest
import torch
from conftest import build_tiny

from moecompress.core.checkpoint import Checkpoint
from moecompress.quant import codecache
from moecompress.quant.codecache import CodeCache
from moecompress.quant.layer import GPTQOptions, PackedCodes
from moecompress.quant.plan import OPTIONS
from moecompress.quant.run import run_quantize

KW = dict(samples=4, seq_len=32, batch_size=4, min_tokens=4, other_bits=16, opts=GPTQOptions(propagate=False))


@pytest.fixture(scope="module")
def qwen(tmp_path_factory, tokenizer_dir):
    return build_tiny("qwen3_moe", tmp_path_factory.mktemp("m") / "qwen3", tokenizer_dir)


def _bytes(folder):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.glob("*.safetensors"))}


def test_a_spilled_layer_reads_back_bit_for_bit(tmp_path):
    gen = torch.Generator().manual_seed(0)
    gu = torch.randint(-(2**31), 2**31 - 1, (3, 8, 4), dtype=torch.int32, generator=gen)
    gus = torch.rand(3, 8, 2, generator=gen).bfloat16()
    shared = (gu, gus)  # two options with the same gate/up codes share them (stored once)
    a = PackedCodes(3, 3, 16, 16, *shared, torch.ones(3, 4, 2, dtype=torch.int32), torch.rand(3, 4, 1), 32, 8)
    b = PackedCodes(3, 4, 16, 16, *shared, torch.zeros(3, 4, 2, dtype=torch.int32), torch.rand(3, 4, 1), 32, 8)
    cache = CodeCache(spill=True, parent=tmp_path)
    cache.put_layer(2, {(3, 3): a, (3, 4): b})
    cache.put_layer(5, {(3, 3): b})
    assert sorted(cache) == [(2, (3, 3)), (2, (3, 4)), (5, (3, 3))] and cache.spilled
    for key, want in (((2, (3, 4)), b), ((5, (3, 3)), b), ((2, (3, 3)), a)):
        got = cache[key]
        for f in ("gate_up", "gate_up_s", "down", "down_s"):
            assert torch.equal(getattr(got, f), getattr(want, f)) and getattr(got, f).dtype == getattr(want, f).dtype
        assert (got.bits, got.down_bits, got.g_h, got.g_i, got.H, got.I) == (want.bits, want.down_bits, 16, 16, 32, 8)
    g2 = cache[(2, (3, 3))]
    assert g2.gate_up.data_ptr() == cache[(2, (3, 4))].gate_up.data_ptr()  # still shared after the read
    with pytest.raises(KeyError):
        cache[(4, 3)]
    folder = next(tmp_path.glob("moecompress-codes-*"))
    cache.close()
    assert not folder.exists()


def test_lp_codes_spill_past_one_layer_and_write_the_same_bytes(qwen, tmp_path, monkeypatch):
    ck = Checkpoint(qwen)
    cfg = ck.config
    one = PackedCodes.estimate(ck.num_experts * 3 * cfg.moe_intermediate_size * cfg.hidden_size, OPTIONS)
    assert len(ck.moe_layers) > 1
    reads: list[int] = []
    read = CodeCache._read
    monkeypatch.setattr(CodeCache, "_read", lambda self, l: (reads.append(l), read(self, l))[1])
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the spill folder: here, checked empty after
    kw = dict(bits=3.0, plan="lp", granularity="expert", method="rtn", **KW)
    outs = {}
    for name, cache in (("memory", 2**30), ("spilled", one)):  # (memory == quantizing again: test_quant_pipeline)
        run_quantize(qwen, tmp_path / name, max_cache_bytes=cache, **kw)
        outs[name] = _bytes(tmp_path / name)
        if name == "spilled":
            assert reads == ck.moe_layers  # every MoE layer read back once, in order
    assert reads == ck.moe_layers  # the in-memory cache read nothing
    assert outs["memory"] == outs["spilled"]
    assert not list(tmp_path.glob("moecompress-codes-*"))
    assert codecache.CodeCache is CodeCache
