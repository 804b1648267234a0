"""merge's per-cluster state under a memory bound: the merge candidates kept between sweeps are capped (by
--max-memory, and at ``STATE_LAYER_FRACTION`` of the layer's experts: by default one cluster's), the others merged
again, with the same choice and error."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moecompress.core.families import MoEWeights
from moecompress.core.limits import set_memory_limit
from moecompress.merge import choose, layer
from moecompress.merge.choose import KINDS, Clustering, LayerFit, choose_clusters
from moecompress.merge.layer import cached_clusters
from moecompress.merge.options import MergeOptions
from moecompress.prune.order import RouterSpec


def _layer(E=8, I=12, H=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    return MoEWeights(gate=r(E, I, H), up=r(E, I, H), down=r(E, H, I), router=r(E, H))


KINDS_NO_KEEP_REFIT = tuple(k for k in KINDS if k != "keep+refit")


def test_capped_candidate_cache_makes_the_same_choice(monkeypatch):
    built: list[tuple[int, ...]] = []
    merge_candidates = choose.merge_candidates
    monkeypatch.setattr(
        choose, "merge_candidates", lambda fit, m, *a: built.append(tuple(m)) or merge_candidates(fit, m, *a)
    )
    w = _layer()
    g = torch.Generator().manual_seed(1)
    fit = LayerFit(w, torch.randn(500, 16, generator=g), torch.randn(250, 16, generator=g), RouterSpec(top_k=2), F.silu)
    clustering = Clustering("test", [[0, 1, 2], [3, 4], [5], [6, 7]], [1, 3, 5, 7])
    freqs = torch.full((8,), 1 / 8)
    runs, merges = {}, {}
    for c in (None, 0, 1):
        built.clear()
        # without keep+refit the start is plain pruning, which the first sweep improves: a second sweep runs
        runs[c] = choose_clusters(fit, clustering, freqs, fit.x[:200], kinds=KINDS_NO_KEEP_REFIT, cache=c)
        merges[c] = list(built)
    assert merges[None] == [(0, 1, 2), (3, 4), (6, 7)]  # each multi-member cluster merged once (two sweeps)
    assert merges[0] == merges[None] * 2 and merges[1] == merges[None] + merges[None][1:]  # the rest merged again
    ref_chosen, ref_start, ref_err, _ = runs[None]
    assert any(c.kind != "keep" for c in ref_chosen)  # merges or refits were chosen: the cache was used
    for chosen, start, err, _ in runs.values():
        assert (start, err) == (ref_start, ref_err)
        assert [c.kind for c in chosen] == [c.kind for c in ref_chosen]
        for a, b in zip(chosen, ref_chosen, strict=True):
            for x, y in zip((a.gate, a.up, a.down, a.row), (b.gate, b.up, b.down, b.row), strict=True):
                assert torch.equal(x, y)


def test_cached_clusters_follow_max_memory_and_the_layer_fraction(monkeypatch):
    w = _layer(E=8, I=12, H=16)
    full = MergeOptions(ratio=0.5)
    try:
        set_memory_limit(10**9)
        assert cached_clusters(w, 4, full, torch.bfloat16) == 1  # the default keeps one cluster's merges
    finally:
        set_memory_limit(None)
    monkeypatch.setattr(layer, "STATE_LAYER_FRACTION", 0.5)
    expert = 3 * 12 * 16 * 2  # one merged expert in bf16
    truncated = MergeOptions(ratio=0.5, rank=2)  # subspace and average candidates per cluster
    try:
        set_memory_limit(10**9)
        assert cached_clusters(w, 4, full, torch.bfloat16) == 4  # half the layer holds 4 clusters' merges
        assert cached_clusters(w, 8, full, torch.bfloat16) == 4
        assert cached_clusters(w, 8, truncated, torch.bfloat16) == 2
        set_memory_limit(4 * 3 * expert)  # a quarter of it holds 3 merged experts
        assert cached_clusters(w, 4, full, torch.bfloat16) == 3
        assert cached_clusters(w, 4, truncated, torch.bfloat16) == 1
        set_memory_limit(1)
        assert cached_clusters(w, 4, full, torch.bfloat16) == 1  # at least one
    finally:
        set_memory_limit(None)


def test_trials_in_row_chunks_make_the_same_choice_bit_for_bit(monkeypatch):
    """A trial gathers the changed tokens' expert outputs ``ROW_CHUNK_BYTES`` at a time (no [n, k, H] copy) and
    ``accept`` writes them back the same way: a few rows per chunk gives the same choices, tensors and errors as one
    chunk, with and without top-k renormalization."""
    w = _layer(seed=3)
    g = torch.Generator().manual_seed(2)
    x_fit, x_eval = torch.randn(400, 16, generator=g), torch.randn(200, 16, generator=g)
    clustering = Clustering("test", [[0, 1, 2], [3, 4], [5], [6, 7]], [1, 3, 5, 7])
    freqs = torch.full((8,), 1 / 8)
    for spec in (RouterSpec(top_k=2), RouterSpec(top_k=3, norm_topk=False)):
        runs = []
        for chunk_bytes in (1 << 25, 3 * 4 * spec.top_k * 16):  # one chunk; 3 rows per chunk
            monkeypatch.setattr(choose, "ROW_CHUNK_BYTES", chunk_bytes)
            fit = LayerFit(w, x_fit, x_eval, spec, F.silu)
            chosen, start, err, d2 = choose_clusters(fit, clustering, freqs, x_fit[:64], KINDS_NO_KEEP_REFIT)
            runs.append((chosen, start, err, d2))
        (a, s0, e0, d0), (b, s1, e1, d1) = runs
        assert [c.kind for c in a] == [c.kind for c in b] and (s0, e0) == (s1, e1) and torch.equal(d0, d1)
        assert any(c.kind != "keep" for c in a) and e0 < s0  # trials were accepted: accept's chunks ran
        for ca, cb in zip(a, b, strict=True):
            assert all(torch.equal(getattr(ca, k), getattr(cb, k)) for k in ("gate", "up", "down", "row"))


def _fit_and_clustering(seed=3):
    w = _layer(E=8, I=12, H=16, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    fit = LayerFit(w, torch.randn(400, 16, generator=g), torch.randn(200, 16, generator=g), RouterSpec(top_k=2), F.silu)
    return w, fit, Clustering("test", [[0, 1, 2], [3, 4], [5], [6, 7]], [1, 3, 5, 7])


def test_pruning_refit_passes_only_refittable_experts_and_keeps_the_others_as_they_are():
    """Kept experts with too few fit tokens are left out of ``fit_downs`` (it skips them, and the Gauss-Seidel fits
    of the others never see them): the downs are bit for bit those of ``fit_downs`` over every kept expert, and a
    down projection left as it is is the layer's own tensor (no copy held through the search)."""
    from moecompress.merge.align import activations
    from moecompress.merge.choose import dense_weights, fit_downs

    w, fit, clustering = _fit_and_clustering()
    w = MoEWeights(**{k: None if v is None else v.to(torch.bfloat16) for k, v in vars(w).items()})
    fit = LayerFit(w, fit.x[:400], fit.x[400:], RouterSpec(top_k=2), F.silu)
    dom = clustering.dominant
    _, state0 = fit.start(clustering)
    dense = dense_weights(state0.wts, torch.as_tensor(dom)[state0.idx], 8)
    for holdout in (0, 3):
        fit_rows = dense[torch.arange(dense.shape[0]) % holdout != 0] if holdout > 1 else dense
        counts = sorted(int(n) for n in (fit_rows[:, dom] > 0).sum(0))
        min_rows = (counts[1] + 0.5) / 12  # the two least routed kept experts (or more, on a tie) below the minimum
        hid = lambda e, r: activations(fit.x[r], w.gate[e], w.up[e], F.silu)  # noqa: E731
        want = fit_downs(hid, w.down, dom, dense, fit.y, state0.yc, kept_only=True, holdout=holdout, min_rows=min_rows)
        chosen, state = fit.start(clustering)
        got, _ = fit.pruning_refit(clustering, chosen, state, holdout=holdout, min_rows=min_rows)
        assert torch.equal(torch.stack([c.down for c in got]), want[0].to(torch.bfloat16))
        skipped = [j for j, e in enumerate(dom) if int((fit_rows[:, e] > 0).sum()) < min_rows * 12]
        assert 2 <= len(skipped) < 4
        for j in skipped:
            assert got[j].kind == "keep" and got[j].down.data_ptr() == w.down[dom[j]].data_ptr()
        assert holdout or sum(c.kind == "keep+refit" for c in got) == 4 - len(skipped)


def test_a_start_made_early_without_outputs_gives_the_same_search():
    """``choose_layer`` starts every clustering before the first search (the cached original outputs are then
    freed): a start without expert outputs, passed as ``begun``, gives the same choice and errors; a search that
    does not start from the pruning refit needs the outputs and refuses such a start."""
    w, fit, clustering = _fit_and_clustering()
    freqs = torch.full((8,), 1 / 8)
    begun = fit.start(clustering, outputs=False)
    assert begun[1].outs is None and begun[1].yc is not None
    ref = choose_clusters(fit, clustering, freqs, fit.x[:200])
    got = choose_clusters(fit, clustering, freqs, fit.x[:200], begun=begun)
    assert (got[1], got[2]) == (ref[1], ref[2]) and torch.equal(got[3], ref[3])
    assert [c.kind for c in got[0]] == [c.kind for c in ref[0]]
    for a, b in zip(got[0], ref[0], strict=True):
        assert torch.equal(a.down, b.down) and torch.equal(a.row, b.row)
    with pytest.raises(ValueError, match="pruning refit"):
        choose_clusters(fit, clustering, freqs, fit.x[:200], KINDS_NO_KEEP_REFIT, begun=fit.start(clustering, False))


def test_a_start_without_outputs_sums_the_routed_output_in_row_blocks_bit_for_bit(monkeypatch):
    """A start without expert outputs sums them a row block at a time (no [T, k, H] copy): its routed output,
    per-token errors and error are the start-with-outputs' bit for bit, in one block or in blocks of 3 rows; the
    pairs not cached (dominant experts outside a token's cached outputs) are computed one expert at a time on all
    its missed rows, as the start with outputs computes them, and kept in the same freed slots."""
    import copy

    _, fit0, clustering = _fit_and_clustering()
    for e in (0, 2):  # removed by an earlier search (as output_error_order does): their slots are free
        fit0.src.release(e)
    for chunk_bytes in (1 << 25, 3 * 4 * 2 * 16):  # one block; 3 rows per block
        monkeypatch.setattr(choose, "ROW_CHUNK_BYTES", chunk_bytes)
        fit, ref = copy.deepcopy(fit0), copy.deepcopy(fit0)
        asked: list[tuple[int, ...]] = []

        asked_experts: list[int] = []

        def get(rows, idx, get=fit.src.get, asked=asked, asked_experts=asked_experts):
            asked.append(tuple(idx.shape))
            asked_experts.extend(idx.unique().tolist())
            return get(rows, idx)

        monkeypatch.setattr(fit.src, "get", get)
        _, full = ref.start(clustering)
        _, bare = fit.start(clustering, outputs=False)
        experts = torch.as_tensor(clustering.dominant)[full.idx]  # [T, k]
        missed = int((fit0.src.slot[torch.arange(600)[:, None], experts] < 0).sum())
        # only the pairs not cached, one call per expert (ascending) with all its missed rows, as one call has them
        assert bare.outs is None and sum(n for n, _ in asked) == missed and missed > 0
        assert all(k == 1 for _, k in asked) and len(asked) == len(set(asked_experts)) > 1
        assert asked_experts == sorted(asked_experts)
        assert torch.equal(bare.yc, full.yc) and torch.equal(bare.d2, full.d2) and bare.err == full.err
        for name in ("cache", "slot", "owner"):  # the computed pairs kept as the start with outputs keeps them
            assert torch.equal(getattr(fit.src, name), getattr(ref.src, name))
        assert bool((fit.src.owner != fit0.src.owner).any())  # some were kept in the freed slots
