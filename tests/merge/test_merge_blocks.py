"""merge's blocked forms (issue 13's memory bound at DeepSeek-V3 dims) give their whole forms' values bit for bit:
the down refit's least squares a block of rows at a time, a trial's routed output in row blocks, the merge candidates
one projection at a time with the router rows fitted up front."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moecompress.core.families import MoEWeights
from moecompress.merge import choose, refit
from moecompress.merge.align import align_cluster
from moecompress.merge.choose import Clustering, LayerFit, _residual, _take, _with_j, merge_candidates
from moecompress.merge.refit import _row_blocks, lstsq_down
from moecompress.merge.subspace import merge_average, merge_subspace
from moecompress.prune.order import RouterSpec


def _lstsq_whole(a, y, prior, ridge=1e-3, dtype=None):
    """lstsq_down before its blocks: the whole right-hand side and one solve."""
    a, y = a.double(), y.double()
    gram = a.T @ a
    lam = ridge * float(gram.diagonal().mean().clamp_min(1e-12))
    rhs = y.T @ a + prior.double() * lam
    sol = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=torch.float64), rhs.T).T
    return sol.to(dtype or prior.dtype)


def test_row_blocks_are_multiples_of_64_or_one_block(monkeypatch):
    monkeypatch.setattr(refit, "TARGET_BLOCK_BYTES", 8 * 100 * 130)  # 130 columns of 100 rows -> blocks of 128
    assert _row_blocks(512, 100) == [(0, 128), (128, 256), (256, 384), (384, 512)]
    assert _row_blocks(320, 100) == [(0, 128), (128, 256), (256, 320)]
    assert _row_blocks(200, 100) == [(0, 200)]  # not a multiple of 64: one block
    assert _row_blocks(512, 10**6) == [(h, h + 64) for h in range(0, 512, 64)]  # at least 64 wide


@pytest.mark.parametrize("H", [256, 200])  # four blocks of 64 rows; one block
@pytest.mark.parametrize("prior_dtype", [torch.bfloat16, torch.float64])
def test_lstsq_down_in_row_blocks_is_bit_for_bit(monkeypatch, H, prior_dtype):
    g = torch.Generator().manual_seed(0)
    t, I = 300, 48
    a = torch.randn(t, I, generator=g)
    y = torch.randn(t, H, generator=g)
    prior = torch.randn(H, I, generator=g).to(prior_dtype)
    prior0 = prior.clone()
    want = _lstsq_whole(a, y, prior, dtype=torch.bfloat16)
    made: list[tuple[int, int]] = []
    fn = lambda h0, h1: made.append((h0, h1)) or y[:, h0:h1]  # noqa: E731
    for block_bytes in (8 * t * 64, 1 << 30):
        monkeypatch.setattr(refit, "TARGET_BLOCK_BYTES", block_bytes)
        got = lstsq_down(a, y, prior, dtype=torch.bfloat16)
        made.clear()
        got_fn = lstsq_down(a, fn, prior, dtype=torch.bfloat16)
        assert torch.equal(got, want) and torch.equal(got_fn, want)
        assert made == _row_blocks(H, t) and len(made) == (4 if H == 256 and block_bytes < 1 << 30 else 1)
    assert torch.equal(prior, prior0)  # a float64 prior is not scaled in place
    assert torch.equal(lstsq_down(a, y, prior), _lstsq_whole(a, y, prior))  # prior's dtype by default


def test_trial_output_and_target_blocks_are_the_whole_ones():
    g = torch.Generator().manual_seed(1)
    n, H = 50, 16
    others = torch.randn(n, H, generator=g)
    jr = torch.tensor([0, 3, 4, 9, 20, 21, 22, 49])
    s, out_j = torch.rand(8, generator=g), torch.randn(8, H, generator=g)
    whole = others.clone().index_add_(0, jr, s[:, None] * out_j)
    assert torch.equal(_with_j(others, jr, s, out_j), whole)
    for step in (1, 7, 21):
        assert torch.equal(torch.cat([_with_j(others, jr, s, out_j, r, r + step) for r in range(0, n, step)]), whole)
    y, rows, orows = torch.randn(80, H, generator=g), torch.randperm(80, generator=g)[:n], torch.arange(n).flip(0)
    assert torch.equal(torch.cat([_residual(y, rows, others, orows, h, h + 5) for h in range(0, H, 5)], 1),
                       y[rows] - others[orows])  # fmt: skip


def test_take_returns_the_tensor_itself_only_for_all_its_rows_in_order():
    x = torch.randn(6, 3)
    assert _take(x, torch.arange(6)) is x
    for rows in (torch.tensor([0, 1, 2, 3, 5, 4]), torch.arange(5), torch.tensor([0, 0, 1, 2, 3, 4])):
        assert torch.equal(_take(x, rows), x[rows]) and _take(x, rows) is not x


def _layer(dtype, E=8, I=12, H=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: (torch.randn(*s, generator=g) * 0.3).to(dtype)  # noqa: E731
    return MoEWeights(gate=r(E, I, H), up=r(E, I, H), down=r(E, H, I), router=r(E, H))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank", [None, 5])  # untruncated (the average); truncated (subspace and average)
@pytest.mark.parametrize("align", [True, False])
def test_merge_candidates_one_projection_at_a_time_equal_the_aligned_copies(dtype, rank, align):
    """merge_candidates permutes and merges one projection at a time from the layer's own tensors: the same
    candidates, bit for bit, as aligning copies of every member (align_cluster) and merging those; the router row
    fitted up front (``fit_router_rows``) is the one fitted on demand."""
    w = _layer(dtype)
    g = torch.Generator().manual_seed(5)
    x_fit, x_eval = torch.randn(300, 16, generator=g), torch.randn(150, 16, generator=g)
    fit = LayerFit(w, x_fit, x_eval, RouterSpec(top_k=2), F.silu)
    freqs = torch.rand(8, generator=g)
    members, ref = [1, 4, 6], 4
    rank_fn = lambda m: rank  # noqa: E731
    mg, mu, md = w.gate[members], w.up[members], w.down[members]
    if align:
        mg, mu, md = align_cluster(x_fit[:64], mg, mu, md, members.index(ref), F.silu, 4)
    rows, _ = fit.router.fit([members])
    f = freqs[members]
    want = [[merge_subspace(m, f, rank, dtype) for m in (mg, mu, md)]]
    if rank is not None:
        want.append([merge_average(m, f, dtype) for m in (mg, mu, md)])
    got = merge_candidates(fit, members, freqs, x_fit[:64], ref, align, rank_fn, 4)
    assert [c.kind for c in got] == ["subspace", "average"][: len(want)]
    for c, parts in zip(got, want, strict=True):
        assert all(torch.equal(a, b) for a, b in zip((c.gate, c.up, c.down), parts, strict=True))
        assert torch.equal(c.row, rows[0]) and c.bias is None
    fit.fit_router_rows([Clustering("test", [[0, 2], [1, 4, 6], [3], [5, 7]], [0, 4, 3, 5])])
    assert fit.router is None and set(fit.rows) == {(0, 2), (1, 4, 6), (5, 7)}
    again = merge_candidates(fit, members, freqs, x_fit[:64], ref, align, rank_fn, 4)
    assert all(torch.equal(a.row, b.row) and torch.equal(a.down, b.down) for a, b in zip(again, got, strict=True))


def test_choose_layer_fits_the_router_rows_before_the_starts(monkeypatch):
    """choose_layer fits every merged cluster's router row before the searches (the fitter's factor is not read
    while their state is held): the searches then find the rows fitted, and the fitter is gone."""
    seen = []
    search = choose.choose_clusters

    def spy(fit, *a, **k):
        seen.append((fit.router, len(fit.rows)))
        return search(fit, *a, **k)

    from moecompress.merge import layer
    from moecompress.merge.options import MergeOptions

    monkeypatch.setattr(layer, "choose_clusters", spy)
    w = _layer(torch.float32)
    x = torch.randn(600, 16, generator=torch.Generator().manual_seed(2))
    layer.merge_layer(w, x, 4, 2, MergeOptions(ratio=0.5, eval_tokens=150, sim_tokens=64, align_tokens=64), act=F.silu)
    assert len(seen) == 2 and all(r is None and n > 0 for r, n in seen)


def test_mapped_allocations_sets_and_restores_the_mmap_threshold(monkeypatch):
    from moecompress.merge import held

    calls: list[tuple[int, int]] = []
    fake = {"mallopt": lambda param, value: calls.append((param, value)) or 1}
    monkeypatch.setattr(held, "libc_function", fake.get)
    with held.mapped_allocations(False):
        pass
    assert calls == []
    with pytest.raises(RuntimeError), held.mapped_allocations():
        assert calls == [(held.M_MMAP_THRESHOLD, held.MAPPED_BYTES), (held.M_TRIM_THRESHOLD, held.MAPPED_BYTES)]
        raise RuntimeError
    top = held.DYNAMIC_MAX_BYTES
    assert calls[2:] == [(held.M_MMAP_THRESHOLD, top), (held.M_TRIM_THRESHOLD, 2 * top)]
    monkeypatch.setattr(held, "libc_function", {}.get)  # no glibc: nothing to set
    with held.mapped_allocations():
        pass


def test_wide_experts_only_on_the_cpu_past_the_size():
    w = _layer(torch.float32)  # I x H = 12 x 16
    assert not choose.wide_experts(w, torch.device("cpu"))
    w = MoEWeights(gate=torch.empty(2, 2048, 2048, device="meta"), up=None, down=None, router=None)
    assert choose.wide_experts(w, torch.device("cpu")) and not choose.wide_experts(w, torch.device("meta"))
