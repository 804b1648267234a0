"""merge's choose state past ``held.state_limit``: the cached expert outputs [T, k+1, H] and the merged layer's routed
outputs [T, k, H] in temporary files, a row block resident at a time, with the same choice and tensors bit for bit."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moecompress.core import held as core_held
from moecompress.core.families import MoEWeights
from moecompress.core.held import Held
from moecompress.merge import choose, held
from moecompress.merge.layer import merge_layer
from moecompress.merge.options import MergeOptions
from moecompress.prune.order import RouterSpec


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
            monkeypatch.setattr(core_held, "HELD_BYTES", limit)
            monkeypatch.setattr(held, "STATE_FLOOR_BYTES", limit)
            monkeypatch.setattr(held, "STATE_LAYER_FRACTION", 1.0 if limit else 0.0)
            monkeypatch.setattr(core_held, "PARK_BYTES", limit)  # the waiting start and best choice so far
            monkeypatch.setattr(choose, "ROW_CHUNK_BYTES", 7 * 4 * spec.top_k * 16)  # 7 rows per block
            spilled.clear()
            merged, info = merge_layer(w, x, 4, spec.top_k, opts, spec=spec, norm_topk=spec.norm_topk, act=F.silu)
            runs.append((merged, info, list(spilled)))
        (m0, i0, s0), (m1, i1, s1) = runs
        assert s0 == [] and (900, spec.top_k + 1, 16) in s1 and (900, spec.top_k, 16) in s1  # cache, routed state
        assert (16, 16) in s1  # the router fit's Cholesky factor
        assert (900, 16) in s1  # the second clustering's start (its routed output) waited in a file
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


def test_parked_candidates_wait_in_files_and_come_back_the_same(monkeypatch):
    """``choose.parked``: a choice's own tensors (a refitted down, a merge; one tensor in two fields parked once) go to
    files past ``held.PARK_BYTES``, the layer's views stay; the call gives back equal values in memory. Below the
    limit, or when nothing waits, the candidates themselves."""
    w = _layer(E=4, I=32, H=64)
    merged = choose.Candidate("subspace", w.gate[0] + 1, w.up[0] + 1, w.down[0] + 1, w.router[0])
    refit = choose.Candidate("keep+refit", w.gate[1], w.up[1], w.down[1] * 2, w.router[1], prior=w.down[1])
    both = choose.Candidate("subspace+refit", merged.gate, merged.up, merged.down * 3, w.router[0], prior=merged.down)
    chosen = [choose.keep_candidate(w, 2), merged, refit, both]
    own = 3 * 32 * 64 * 4 + 2 * 64 * 32 * 4  # merged's gate/up/down (shared with ``both``) + two refitted downs
    assert choose.parked(chosen, w, wait=False)() is chosen
    assert choose.parked(chosen, w)() is chosen  # 40 KB: below the default limit
    held_ = []
    of = Held.of.__func__

    def spy(cls, t, limit=None, block=1 << 25):
        h = of(cls, t, limit, block)
        held_.append(h)
        return h

    monkeypatch.setattr(Held, "of", classmethod(spy))
    monkeypatch.setattr(core_held, "PARK_BYTES", own - 1)
    back = choose.parked(chosen, w)
    assert len(held_) == 5 and all(h.spilled for h in held_)  # merged's three, two refitted downs; no view of w
    again = back()
    assert again is not chosen and again[0] is not chosen[0]
    for a, b in zip(again, chosen, strict=True):
        assert a.kind == b.kind and a.row is b.row
        for f in choose.PARKED_FIELDS:
            ta, tb = getattr(a, f), getattr(b, f)
            assert (ta is None) == (tb is None) and (ta is None or torch.equal(ta, tb)), (b.kind, f)
    assert again[0].gate.data_ptr() == w.gate[2].data_ptr()  # the layer's views stay views
    assert again[3].prior is again[1].down  # one tensor in two fields comes back as one
