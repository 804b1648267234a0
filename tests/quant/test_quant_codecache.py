"""The LP measuring pass's codes spilled to row files as they are made (quant/codecache.py, quant/rowfile.py) when
they pass the memory bound: the probes and the write pass read back the same bits and write the same bytes as the
in-memory cache."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import build_tiny

from moecompress.core.checkpoint import Checkpoint
from moecompress.quant import codecache
from moecompress.quant import run as run_mod
from moecompress.quant.codecache import CodeCache
from moecompress.quant.layer import GPTQOptions, PackedCodes, quantize_layer
from moecompress.quant.plan import OPTIONS
from moecompress.quant.rowfile import RowFile
from moecompress.quant.run import run_quantize

KW = dict(samples=4, seq_len=32, batch_size=4, min_tokens=4, other_bits=16, opts=GPTQOptions(propagate=False))


@pytest.fixture(scope="module")
def qwen(tmp_path_factory, tokenizer_dir):
    return build_tiny("qwen3_moe", tmp_path_factory.mktemp("m") / "qwen3", tokenizer_dir)


def _bytes(folder):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.glob("*.safetensors"))}


def test_row_files_read_back_bit_for_bit(tmp_path):
    gen = torch.Generator().manual_seed(0)
    want = {
        torch.int32: torch.randint(-(2**31), 2**31 - 1, (3, 8, 4), dtype=torch.int32, generator=gen),
        torch.bfloat16: torch.randn(3, 8, 2, generator=gen).bfloat16(),
        torch.float16: torch.randn(3, 8, 2, generator=gen).half(),
    }
    for dt, t in want.items():
        rf = RowFile(tuple(t.shape), dt, tmp_path)
        for e in (2, 0, 1):  # any order
            rf[e] = t[e]
        for e in range(3):
            got = rf[e]
            assert got.dtype == dt and torch.equal(got.view(torch.uint8), t[e].contiguous().view(torch.uint8))
            assert torch.equal(rf[e, 2:5], t[e, 2:5]) and torch.equal(rf[e, 0:8], t[e])
        assert torch.equal(rf[-1], t[2]) and (rf.numel(), rf.element_size()) == (t.numel(), t.element_size())
        with pytest.raises(ValueError):
            rf[0] = t[0].float()  # a row of another dtype
        with pytest.raises(IndexError):
            rf[3]
    unset = RowFile((2, 3), torch.int32, tmp_path)
    unset[0] = torch.arange(3, dtype=torch.int32)
    assert torch.equal(unset[1], torch.zeros(3, dtype=torch.int32))  # never written: zeros
    path = Path(unset.path)
    del unset
    assert not path.exists()  # the file goes with the object


def test_spilled_codes_are_the_in_memory_codes(tmp_path):
    """quantize_layer with ``spill`` makes the same codes as in memory (shared gate/up stored once), in row files
    of the cache's folder, removed with the cache."""
    gen = torch.Generator().manual_seed(1)
    E, H, I = 3, 64, 32
    gu = torch.randn(E, 2 * I, H, generator=gen) * 0.1
    dn = torch.randn(E, H, I, generator=gen) * 0.1
    widths = ((2, 3), (2, 4), 3)
    args = (gu, dn, torch.nn.functional.silu, widths, "rtn", None, 4, torch.bfloat16)
    mem, _, _ = quantize_layer(*args, packed=True)
    cache = CodeCache(spill=True, parent=tmp_path)
    spilled, _, _ = quantize_layer(*args, packed=True, spill=cache.folder)
    cache.put_layer(2, spilled)
    assert cache.spilled and sorted(cache, key=str) == sorted(((2, w) for w in widths), key=str)
    assert len(list(cache.folder.iterdir())) == 2 * 2 + 2 * 3  # gate/up at 2 bits once, gate/up at 3, 3 downs
    for w in widths:
        got = cache[(2, w)]
        assert isinstance(got.down, RowFile)
        for e in range(E):
            for f in ("gate_up", "gate_up_s", "down", "down_s"):
                assert torch.equal(getattr(got, f)[e], getattr(mem[w], f)[e]), (w, e, f)
            for which in (0, 1):
                assert torch.equal(got.weight(e, which), mem[w].weight(e, which))
    with pytest.raises(KeyError):
        cache[(4, 3)]
    folder = cache.folder
    cache.close()
    assert not folder.exists()


def test_lp_codes_spill_past_the_bound_and_write_the_same_bytes(qwen, tmp_path, monkeypatch):
    ck = Checkpoint(qwen)
    cfg = ck.config
    one = PackedCodes.estimate(ck.num_experts * 3 * cfg.moe_intermediate_size * cfg.hidden_size, OPTIONS)
    assert len(ck.moe_layers) > 1
    made: list[tuple] = []
    init = RowFile.__init__
    monkeypatch.setattr(RowFile, "__init__", lambda self, *a: (made.append(a[0]), init(self, *a))[1])
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the spill folder: here, checked empty after
    kw = dict(bits=3.0, plan="lp", granularity="expert", method="rtn", **KW)
    outs = {}
    for name, cache in (("memory", 2**30), ("spilled", one)):  # (memory == quantizing again: test_quant_pipeline)
        run_quantize(qwen, tmp_path / name, max_cache_bytes=cache, **kw)
        outs[name] = _bytes(tmp_path / name)
        if name == "memory":
            assert not made  # the in-memory cache made no files
    # every MoE layer's codes in files: per layer 4 gate/up widths + 16 downs, codes and scales each
    assert len(made) == len(ck.moe_layers) * 2 * (4 + 16)
    assert outs["memory"] == outs["spilled"]
    assert not list(tmp_path.glob("moecompress-codes-*"))
    assert codecache.CodeCache is CodeCache


def test_code_memory_bound_is_relative_to_the_layer(monkeypatch):
    monkeypatch.setattr(run_mod, "code_cache_bound", lambda: 10 * 2**30)
    assert run_mod.code_memory_bound(2**20) == run_mod.CODE_MEMORY_FLOOR  # small layers: the floor
    assert run_mod.code_memory_bound(8 * 2**30) == 2 * 2**30  # a quarter of the layer
    monkeypatch.setattr(run_mod, "code_cache_bound", lambda: 2**30)
    assert run_mod.code_memory_bound(8 * 2**30) == 2**30  # the memory limit's share wins
