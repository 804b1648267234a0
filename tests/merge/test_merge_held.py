"""merge's choose state past ``held.state_limit``: the cached expert outputs [T, k+1, H] and the merged layer's routed
outputs [T, k, H] in temporary files, a row block resident at a time, with the same choice and tensors bit for bit."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moecompress.core.families import MoEWeights
from moecompress.merge import choose, held
from moecompress.merge.held import Held
from moecompress.merge.layer import merge_layer
from moecompress.merge.options import MergeOptions
from moecompress.prune.order import RouterSpec


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def test_held_in_memory_below_the_limit_and_in_a_file_above_it_keeps_values_and_drops_pages():
    small = Held.empty((4, 3), limit=1024)
    assert not small.spilled
    small.drop()  # a no-op in memory
    big = Held.empty((16, 1 << 20), limit=1024)  # 64 MiB
    assert big.spilled
    before = _rss()
    big.t.copy_(torch.arange(16, dtype=torch.float32)[:, None].expand(16, 1 << 20))
    filled = _rss()
    assert filled - before > 48 << 20  # the written pages are resident ...
    big.drop()
    assert filled - _rss() > 48 << 20  # ... until dropped
    assert torch.equal(big.t[:, 12345], torch.arange(16, dtype=torch.float32))  # the values come back from the file
    assert torch.equal(big.t[7], torch.full((1 << 20,), 7.0))
    assert not Held.empty((16, 1 << 20), "meta", limit=1024).spilled  # only CPU tensors go to a file
    t = torch.randn(100, 30, dtype=torch.float64)
    copy = Held.of(t, limit=0, block=7 * 30 * 8)  # written 7 rows at a time
    assert copy.spilled and copy.t.dtype == torch.float64 and torch.equal(copy.t, t)
    assert Held.of(t).t is t  # below the limit: the tensor itself


def _layer(E=8, I=12, H=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    return MoEWeights(gate=r(E, I, H), up=r(E, I, H), down=r(E, H, I), router=r(E, H))


def test_choose_state_in_files_gives_the_same_merge_bit_for_bit(monkeypatch):
    """merge_layer's measured choice (starts, pruning refit, trials, accepts, final refit) with every choose state in
    a file (every limit 0) and in memory: the same clusters, choices, errors and merged tensors, with and without
    top-k renormalization; and the files were used (the cache, each routed state, the router fit's factor)."""
    spilled: list[tuple[int, ...]] = []
    empty = Held.empty.__func__

    def counting(cls, shape, device="cpu", limit=None, dtype=torch.float32):
        h = empty(cls, shape, device, limit, dtype)
        if h.spilled:
            spilled.append(tuple(shape))
        return h

    monkeypatch.setattr(Held, "empty", classmethod(counting))
    w = _layer(E=8, seed=5)
    x = torch.randn(900, 16, generator=torch.Generator().manual_seed(6))
    for spec in (RouterSpec(top_k=2), RouterSpec(top_k=3, norm_topk=False)):
        opts = MergeOptions(ratio=0.5, eval_tokens=300, fit_tokens=600, sim_tokens=64, align_tokens=64)
        runs = []
        for limit in (1 << 30, 0):
            monkeypatch.setattr(held, "HELD_BYTES", limit)
            monkeypatch.setattr(held, "STATE_FLOOR_BYTES", limit)
            monkeypatch.setattr(held, "STATE_LAYER_FRACTION", 1.0 if limit else 0.0)
            monkeypatch.setattr(choose, "ROW_CHUNK_BYTES", 7 * 4 * spec.top_k * 16)  # 7 rows per block
            spilled.clear()
            merged, info = merge_layer(w, x, 4, spec.top_k, opts, spec=spec, norm_topk=spec.norm_topk, act=F.silu)
            runs.append((merged, info, list(spilled)))
        (m0, i0, s0), (m1, i1, s1) = runs
        assert s0 == [] and (900, spec.top_k + 1, 16) in s1 and (900, spec.top_k, 16) in s1  # cache, routed state
        assert (16, 16) in s1  # the router fit's Cholesky factor
        assert any(c != "keep" for c in i0["choices"])  # trials were accepted: the state was written to
        i0.pop("seconds"), i1.pop("seconds")
        assert i0 == i1
        for k in ("gate", "up", "down", "router"):
            assert torch.equal(getattr(m0, k), getattr(m1, k)), k


def test_state_limit_keeps_small_layers_in_memory_and_flagship_state_in_files():
    """The [Tc, ., H] state stays in memory up to max(256 MiB, half the layer's routed experts): E16 at H 512 keeps
    its 12,288-token cache (226 MB) in memory; the DeepSeek-V3-dims slice (1.41 GB of bf16 experts) puts its
    4,096-token cache (1,057 MB) and routed state (940 MB) in files, as the Qwen3-30B layer (1.21 GB) at 12,288
    tokens (906, 805 MB); the 30B layer at 4,096 tokens (302, 268 MB) stays in memory."""
    mb = 10**6
    e16 = held.state_limit(16 * 3 * 256 * 512 * 2)
    assert e16 == held.STATE_FLOOR_BYTES and 12_288 * 9 * 512 * 4 < e16
    slice_ = held.state_limit(16 * 3 * 2048 * 7168 * 2)
    assert 700 * mb < slice_ < 1_057 * mb and 940 * mb > slice_
    q30 = held.state_limit(128 * 3 * 768 * 2048 * 2)
    assert 805 * mb > q30 > 302 * mb
