"""Pure parts of expert pruning: counts, score orders, selection, routing emulation, output-error greedy."""

import pytest
import torch
from conftest import build_tiny
from transformers import AutoModelForCausalLM

from moecompress.core.errors import UserError
from moecompress.core.experts import expert_hidden
from moecompress.core.families import family_for
from moecompress.merge.refit import refit_down
from moecompress.prune.load import layer_view, prune_in_memory
from moecompress.prune.order import (
    ExpertOutputs,
    NotEnoughRemovable,
    RouterSpec,
    Step,
    cache_slots,
    combine,
    kept_global,
    kept_uniform,
    layer_output,
    output_error_order,
    outputs_by_token,
    possible_ratios,
    removal_count,
    route,
    routed_chunk,
    routed_output,
    router_choice,
    score_order,
)
from moecompress.prune.refit import dense_weights, fit_downs, refit_downs, refit_router, ridge_step
from moecompress.prune.transform import PruneOptions

SOFT = RouterSpec(top_k=2)
GROUPED = RouterSpec(top_k=2, kind="sigmoid_group", n_group=2, topk_group=1)


def test_removal_count_rounds_and_refuses():
    assert removal_count(16, 0.25, SOFT) == (4, None)
    assert removal_count(16, 0.5, SOFT) == (8, None)
    with pytest.raises(ValueError, match="between 0 and 1"):
        removal_count(16, 1.0, SOFT)
    with pytest.raises(ValueError, match="between 0 and 1"):
        removal_count(16, 0.0, SOFT)
    with pytest.raises(ValueError, match="fewer than top-k 2"):
        removal_count(6, 0.9, SOFT)  # 5 removed, 1 left
    with pytest.raises(ValueError, match="removes no expert"):
        removal_count(6, 0.01, SOFT)
    n, note = removal_count(8, 0.34, GROUPED)  # 3 of 8 breaks 8 % 2: the same count from each group instead
    assert n == 4 and "multiple of n_group=2" in note
    assert GROUPED.min_keep() == 4  # two per group (top-2 group scores), and topk_group * per_group >= top_k
    with pytest.raises(ValueError, match="router's minimum 4"):
        removal_count(8, 0.7, GROUPED)


def test_score_order_groups_and_protection():
    s = torch.tensor([0.5, 0.1, 0.3, 0.2, 0.9, 0.05, 0.4, 0.6])
    assert [st.experts for st in score_order(s, set())][:3] == [(5,), (1,), (3,)]
    assert all(5 not in st.experts for st in score_order(s, {5}))
    grouped = score_order(s, {1}, n_group=2)  # groups 0-3 and 4-7; round r = r-th weakest of each group
    assert grouped[0].experts == (3, 5) and grouped[0].cost == pytest.approx(0.25)
    assert grouped[1].experts == (2, 6)
    assert len(grouped) == 3  # group 0 has only 3 unprotected experts


def test_kept_uniform_and_global():
    orders = {
        0: [Step((e,), c) for e, c in [(3, 0.01), (2, 0.02), (1, 0.5)]],
        1: [Step((e,), c) for e, c in [(0, 0.1), (1, 0.2), (2, 0.3)]],
    }
    assert kept_uniform(orders, 1, 4) == {0: [0, 1, 2], 1: [1, 2, 3]}
    glob = kept_global(orders, 2, 4, min_keep=2)
    assert glob == {0: [0, 1], 1: [0, 1, 2, 3]}  # both of layer 0's cheap steps, none of layer 1's
    glob = kept_global(orders, 3, 4, min_keep=2)  # layer 0 stops at min_keep, the next goes to layer 1
    assert glob == {0: [0, 1], 1: [1, 2, 3]}
    with pytest.raises(NotEnoughRemovable, match="protected"):
        kept_uniform({0: orders[0][:1]}, 2, 4)
    with pytest.raises(NotEnoughRemovable, match="only 4 of the 5"):
        kept_global(orders, 5, 4, min_keep=2)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "olmoe", "deepseek_v3"])
def test_route_matches_transformers_router_with_and_without_experts(family, tmp_path, tokenizer_dir):
    """route(logits, mask) == the stock router of the model with those experts deleted (any family semantics)."""
    path = build_tiny(family, tmp_path / family, tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="eager").eval()
    fam = family_for(model.config)
    spec = RouterSpec.from_config(fam, model.config)
    l = fam.moe_layers(model.config)[-1]
    x = torch.randn(64, model.config.hidden_size)
    w = layer_view(model, fam, l)
    E = w.num_experts
    gone = [1, 6] if family == "deepseek_v3" else [2]  # one per group for DeepSeek
    mask = torch.zeros(E, dtype=torch.bool)
    mask[gone] = True
    keep = [e for e in range(E) if e not in gone]
    with torch.no_grad():
        logits = x @ w.router.T
        for removed, kept in ((None, list(range(E))), (mask, keep)):
            if removed is not None:
                prune_in_memory(model, {l: keep})
            router = getattr(getattr(model.model.layers[l], fam.module_block), fam.router)
            _, ref_w, ref_idx = router(x)
            ours_w, ours_idx = route(logits, spec, removed, w.correction_bias)
            ref_old = torch.tensor(kept)[ref_idx]  # renumbered -> original ids
            o1, o2 = ref_old.sort(-1), ours_idx.sort(-1)
            assert torch.equal(o1.values, o2.values)
            torch.testing.assert_close(ref_w.float().gather(1, o1.indices), ours_w.gather(1, o2.indices))


def test_output_error_greedy_first_step_is_brute_force_best():
    g = torch.Generator().manual_seed(0)
    T, E, H = 200, 6, 8
    outs = torch.randn(T, E, H, generator=g)
    logits = torch.randn(T, E, generator=g) * 2
    y0 = combine(outs, *route(logits, SOFT))
    errs = []
    for e in range(E):
        m = torch.zeros(E, dtype=torch.bool)
        m[e] = True
        errs.append(float((combine(outs, *route(logits, SOFT, m)) - y0).pow(2).sum() / y0.pow(2).sum()))
    order = output_error_order(outs, logits, SOFT, set(), 3)
    assert order[0].experts == (min(range(E), key=errs.__getitem__),)
    assert order[0].cost == pytest.approx(min(errs))
    assert len(order) == 3 and len({s.experts for s in order}) == 3
    scaled = output_error_order(outs, logits, SOFT, set(), 3, scale=10 * float(y0.pow(2).sum()))
    assert [s.experts for s in scaled] == [s.experts for s in order]  # the order is the layer's own
    assert [s.cost for s in scaled] == pytest.approx([s.cost / 10 for s in order])  # costs compare across layers
    protected = {order[0].experts[0]}
    assert all(protected.isdisjoint(s.experts) for s in output_error_order(outs, logits, SOFT, protected, 3))
    grouped = output_error_order(outs[:, :4], logits[:, :4], RouterSpec(2, "sigmoid_group", True, 2, 2), set(), 2)
    assert len(grouped) == 1 and sorted(e // 2 for e in grouped[0].experts) == [0, 1]  # one from each group


def _naive_greedy(outs, logits, spec, n, correction=None, protected=()):
    """Recompute every token's routed output for every candidate (the definition of the greedy)."""
    y0 = combine(outs, *route(logits, spec, None, correction))
    denom = float(y0.double().pow(2).sum())
    removed = torch.zeros(logits.shape[1], dtype=torch.bool)
    Eg = logits.shape[1] // spec.n_group
    order, errs = [], []
    for _ in range(n):
        lost = [int(removed[g * Eg : (g + 1) * Eg].sum()) for g in range(spec.n_group)]
        best = None
        for e in range(logits.shape[1]):
            if removed[e] or e in protected or lost[e // Eg] != min(lost):
                continue
            t = removed.clone()
            t[e] = True
            err = float((combine(outs, *route(logits, spec, t, correction)) - y0).double().pow(2).sum())
            if best is None or err < best[1]:
                best = (e, err)
        removed[best[0]] = True
        order.append(best[0])
        errs.append(best[1] / denom)
    return order, errs


def _experts(seed, T=400, E=8, H=6, I=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    gate, up = torch.randn(E, I, H, generator=g), torch.randn(E, I, H, generator=g)
    down = torch.randn(E, H, I, generator=g)
    return x, gate, up, down, torch.randn(T, E, generator=g) * 2, torch.randn(E, generator=g) * 0.1


SPECS = [SOFT, RouterSpec(top_k=2, norm_topk=False), RouterSpec(3, "sigmoid_group", True, 2, 1, 2.5),
         RouterSpec(2, "sigmoid_group", True, 2, 2)]  # fmt: skip


@pytest.mark.parametrize("spec", SPECS, ids=["softmax", "softmax-no-norm", "groups", "groups-topk2"])
@pytest.mark.parametrize("cached", [False, True], ids=["dense", "cached"])
def test_incremental_greedy_equals_naive_recompute(spec, cached):
    """The incremental greedy (only tokens whose top-k can change are recomputed) makes the same choices with the
    same costs as recomputing every token for every candidate, with outputs held densely or cached for each
    token's best few experts (c=3 < k+1 for some specs: the rest is computed on demand into freed slots)."""
    for seed in range(3):
        x, gate, up, down, logits, corr = _experts(seed)
        corr = corr if spec.kind != "softmax" else None
        dense = outputs_by_token(x, gate, up, down)
        src = ExpertOutputs(x, gate, up, down, router_choice(logits, spec, corr), 3) if cached else dense
        n = 6 if spec.n_group == 1 else 4  # two rounds of one expert per group: each group of 4 keeps 2
        protected = {5} if spec.n_group == 1 else set()
        order = output_error_order(src, logits, spec, protected, n, corr)
        naive, errs = _naive_greedy(dense, logits, spec, n, corr, protected)
        g = spec.n_group
        rounds = [sorted(naive[i : i + g]) for i in range(0, len(naive), g)]
        assert [list(s.experts) for s in order] == rounds
        assert [sum(s.cost for s in order[: i + 1]) for i in range(len(order))] == pytest.approx(
            errs[g - 1 :: g], rel=1e-5, abs=1e-9
        )


@pytest.mark.parametrize("spec", SPECS, ids=["softmax", "softmax-no-norm", "groups", "groups-topk2"])
def test_greedy_given_the_callers_routed_output_is_the_same_bit_for_bit(spec):
    """``output_error_order(..., y0=...)`` (the prune transform passes the y it computed already) makes the same
    choices with the same costs, bit for bit, as the greedy computing y itself."""
    x, gate, up, down, logits, corr = _experts(1)
    corr = corr if spec.kind != "softmax" else None
    n = 6 if spec.n_group == 1 else 4
    runs = []
    for given in (False, True):
        src = ExpertOutputs(x, gate, up, down, router_choice(logits, spec, corr), 3)
        y0 = routed_output(src, torch.arange(x.shape[0]), *route(logits, spec, None, corr)) if given else None
        runs.append([(s.experts, s.cost) for s in output_error_order(src, logits, spec, set(), n, corr, y0=y0)])
    assert runs[0] == runs[1] and len(runs[0]) == n // spec.n_group
    src = ExpertOutputs(x, gate, up, down, router_choice(logits, spec, corr), 3)
    wrong = output_error_order(src, logits, spec, set(), n, corr, y0=torch.zeros(x.shape[0], down.shape[1]))
    assert [(s.experts, s.cost) for s in wrong] != runs[0]  # the given y0 is the one used


def test_outputs_by_token_cache_is_exact_and_reuses_freed_slots():
    x, gate, up, down, logits, _ = _experts(4, T=50)
    dense = outputs_by_token(x, gate, up, down)
    src = ExpertOutputs(x, gate, up, down, logits, 2)
    rows = torch.arange(50)
    idx = torch.randint(0, 8, (50, 3), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(src.get(rows, idx), dense[rows[:, None], idx])
    e = int(logits.argmax(1)[0])  # token 0 caches its best expert
    src.release(e)
    assert int(src.slot[0, e]) == -1
    other = int(logits[0].argsort()[0])  # its worst: not cached until asked for, then kept in the freed slot
    assert int(src.slot[0, other]) == -1
    torch.testing.assert_close(src.get(rows[:1], torch.tensor([[other]])), dense[:1, [other]])
    assert int(src.slot[0, other]) >= 0


def test_group_rounding_says_so_and_lists_possible_ratios():
    eight_pairs = RouterSpec(top_k=2, kind="sigmoid_group", n_group=8, topk_group=2)
    with pytest.raises(ValueError) as err:
        removal_count(16, 0.25, eight_pairs)
    msg = str(err.value)
    assert not isinstance(err.value, UserError) and "--" not in msg  # the CLI layer names the flag, not the math
    assert "4 of 16 experts rounds to 8" in msg and "8 groups of 2" in msg
    assert "router's minimum 16" in msg and "no ratio can remove experts" in msg
    four = RouterSpec(top_k=4, kind="sigmoid_group", n_group=4, topk_group=2)
    assert possible_ratios(16, four) == [0.25, 0.5]
    with pytest.raises(ValueError, match=r"13 of 16 experts rounds to 12 .*possible ratios: 0.25, 0.5"):
        removal_count(16, 0.8, four)


def _layer_error(x, gate, up, down, weight, spec, removed, y0, corr=None):
    src = ExpertOutputs(x, gate, up, down, router_choice(x @ weight.T, spec, corr), 10)
    y = combine(outputs_by_token(x, gate, up, down), *route(x @ weight.T, spec, removed, corr))
    return src, float((y - y0).pow(2).sum())


@pytest.mark.parametrize("spec", [SOFT, RouterSpec(top_k=2, norm_topk=False)], ids=["norm", "no-norm"])
def test_refit_lowers_the_pruned_layer_output_error(spec):
    """Router refit, then down refit, each lower ||y_pruned - y||^2 on the calibration tokens of a tiny layer."""
    g = torch.Generator().manual_seed(3)
    T, E, H, I = 600, 6, 8, 12
    x = torch.randn(T, H, generator=g)
    gate, up = torch.randn(E, I, H, generator=g) * 0.5, torch.randn(E, I, H, generator=g) * 0.5
    down = torch.randn(E, H, I, generator=g) * 0.5
    weight = torch.randn(E, H, generator=g)
    y0 = combine(outputs_by_token(x, gate, up, down), *route(x @ weight.T, spec))
    removed = torch.zeros(E, dtype=torch.bool)
    removed[[1, 4]] = True
    src, before = _layer_error(x, gate, up, down, weight, spec, removed, y0)
    rows, bias, e0, e1 = refit_router(src, x, weight, None, spec, removed, y0, steps=60)
    assert bias is None and e0 == pytest.approx(before, rel=1e-4)
    _, after = _layer_error(x, gate, up, down, rows, spec, removed, y0)
    assert after == pytest.approx(e1, rel=1e-4) and after < 0.9 * before
    assert torch.equal(rows[removed], weight[removed])
    w_orig = dense_weights(*route(x @ weight.T, spec), E)
    w_new = dense_weights(*route(x @ rows.T, spec, removed), E)
    kept = [e for e in range(E) if not removed[e]]
    new_down = refit_downs(x, gate, up, down, kept, w_orig, w_new)
    assert torch.equal(new_down[removed], down[removed])
    y = combine(outputs_by_token(x, gate, up, new_down), *route(x @ rows.T, spec, removed))
    assert float((y - y0).pow(2).sum()) < 0.9 * after


def test_outputs_by_token_and_combine_equal_the_experts_module(tmp_path, tokenizer_dir):
    path = build_tiny("qwen3_moe", tmp_path / "q", tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="eager").eval()
    fam = family_for(model.config)
    block = model.model.layers[0].mlp
    x = torch.randn(40, model.config.hidden_size)
    with torch.no_grad():
        _, w, idx = block.gate(x)
        ref = block.experts(x, idx, w)
        v = layer_view(model, fam, 0)
        ours = combine(outputs_by_token(x, v.gate, v.up, v.down), w, idx)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("spec", SPECS, ids=["softmax", "softmax-no-norm", "groups", "groups-topk2"])
def test_output_error_search_and_refit_on_cuda_equal_cpu(spec):
    """Every tensor of the search and the refit follows the data's device: the same order on CUDA as on the CPU.
    Group routing removes at most down to the router's minimum (``min_keep``): past it a chosen group holds fewer
    than top-k routable experts, and which masked (-inf) expert fills the top-k is up to each device's topk (on an
    H200 the "groups" case, 4 removals of 8 where 6 must stay, picked (1, 7) where the CPU picked (1, 6))."""
    x, gate, up, down, logits, corr = _experts(1)
    corr = corr if spec.kind != "softmax" else None
    n = 6 if spec.n_group == 1 else 8 - spec.min_keep()
    runs = []
    for dev in ("cpu", "cuda"):
        t = [v.to(dev) if v is not None else None for v in (x, gate, up, down, logits, corr)]
        src = ExpertOutputs(t[0], t[1], t[2], t[3], router_choice(t[4], spec, t[5]), 3)
        runs.append(output_error_order(src, t[4], spec, {5} if spec.n_group == 1 else set(), n, t[5]))
    assert [s.experts for s in runs[0]] == [s.experts for s in runs[1]]
    assert [s.cost for s in runs[0]] == pytest.approx([s.cost for s in runs[1]], rel=1e-4, abs=1e-9)
    if spec.kind == "softmax":
        removed = torch.zeros(8, dtype=torch.bool, device="cuda")
        removed[[1, 4]] = True
        xc, wc = x.cuda(), (torch.randn(8, 6, generator=torch.Generator().manual_seed(2))).cuda()
        gc, uc, dc = gate.cuda(), up.cuda(), down.cuda()
        y0 = combine(outputs_by_token(xc, gc, uc, dc), *route(xc @ wc.T, spec))
        src = ExpertOutputs(xc, gc, uc, dc, xc @ wc.T, 4)
        rows, _, e0, e1 = refit_router(src, xc, wc, None, spec, removed, y0, steps=10)
        assert rows.device.type == "cuda" and e1 <= e0
        kept = [e for e in range(8) if not removed[e]]
        w_o, w_n = dense_weights(*route(xc @ wc.T, spec), 8), dense_weights(*route(xc @ rows.T, spec, removed), 8)
        assert refit_downs(xc, gc, uc, dc, kept, w_o, w_n).device.type == "cuda"


class _Bank:
    """Expert tensors indexed as refit_down's members: 0..E-1 the original experts, E..E+K-1 the kept experts with
    negated current down projections, E+K a zero expert (so a target y - sum_{j != e} w_j f_j is a member sum)."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, cur: torch.Tensor, kept: list[int]):
        self.E, self.K, self.kept = gate.shape[0], len(kept), kept
        self.gate = _BankPart(self, gate, gate, 1.0)
        self.up = _BankPart(self, up, up, 1.0)
        self.down = _BankPart(self, down, cur, -1.0)


class _BankPart:
    def __init__(self, bank: _Bank, orig: torch.Tensor, cur: torch.Tensor, sign: float):
        self.bank, self.orig, self.cur, self.sign = bank, orig, cur, sign
        self.shape = (bank.E + bank.K + 1, *orig.shape[1:])

    def __getitem__(self, m: int) -> torch.Tensor:
        b = self.bank
        if m < b.E:
            return self.orig[m]
        if m < b.E + b.K:
            return self.sign * self.cur[b.kept[m - b.E]]
        return torch.zeros_like(self.orig[0])


def refit_downs_members(
    x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, kept: list[int],
    w_orig: torch.Tensor, w_new: torch.Tensor, ridge: float = 1e-3,
) -> torch.Tensor:  # fmt: skip
    """Reference form of ``refit_downs`` through ``merge.refit.refit_down`` (targets built from member experts' outputs:
    ~2 k^2 expert evaluations per token; kept to test the cheap form against). One kept expert at a time,
    Gauss-Seidel: each fit sees the others' already refitted outputs).

    For kept expert e on the tokens routed to it (new weight w_e > 0) the target is its share of the original
    output, y(x) - sum_{j != e} w_j(x) f_j(x), reproduced by w_e(x) W h_e(x). Args: x [T, H]; gate/up [E, I, H],
    down [E, H, I] original experts; w_orig, w_new: dense routing weights [T, E] of the original and the pruned
    (refitted) router. Returns [E, H, I] (removed experts' rows unchanged)."""
    E, K = gate.shape[0], len(kept)
    cur = down.clone()
    bank = _Bank(gate, up, down, cur, kept)
    for e in kept:
        on = w_new[:, e] > 0
        if not bool(on.any()):
            continue
        W = torch.zeros(int(on.sum()), E + K + 1, dtype=torch.float64, device=x.device)  # only the tokens routed to e
        W[:, :E] = w_orig[on].double()
        W[:, E : E + K] = w_new[on][:, kept].double()
        W[:, E + kept.index(e)] = 0.0
        W[:, E + K] = w_new[on, e].double() - W[:, : E + K].sum(1)
        members = (W[:, : E + K] != 0).any(0).nonzero().squeeze(1).tolist() + [E + K]  # the ones that contribute
        cur[e] = refit_down(x[on], W, members, bank.gate, bank.up, bank.down, gate[e], up[e], cur[e], ridge)
    return cur


@pytest.mark.parametrize(
    "spec", [SOFT, RouterSpec(top_k=2, norm_topk=False), SPECS[2]], ids=["norm", "no-norm", "groups"]
)
def test_cheap_down_refit_equals_the_member_sum_form(spec):
    """refit_downs with explicit targets (the layer output kept per token) equals the reference that rebuilds every
    target from member experts' outputs, with or without the outputs passed in."""
    x, gate, up, down, logits, corr = _experts(7, T=300)
    corr = corr if spec.kind != "softmax" else None
    E = gate.shape[0]
    removed = torch.zeros(E, dtype=torch.bool)
    removed[[0, 3] if spec.n_group == 1 else [0, 5]] = True
    kept = [e for e in range(E) if not removed[e]]
    w_orig = dense_weights(*route(logits, spec, None, corr), E)
    w_p, idx_p = route(logits + 0.3 * torch.randn(logits.shape, generator=torch.Generator().manual_seed(1)), spec,
                       removed, corr)  # fmt: skip
    w_new = dense_weights(w_p, idx_p, E)
    ref = refit_downs_members(x, gate, up, down, kept, w_orig, w_new)
    ours = refit_downs(x, gate, up, down, kept, w_orig, w_new)
    dense = outputs_by_token(x, gate, up, down)
    given = refit_downs(x, gate, up, down, kept, None, w_new, y0=combine(dense, *route(logits, spec, None, corr)),
                        y_new=combine(dense, w_p, idx_p))  # fmt: skip
    assert not torch.equal(ref[kept], down[kept])
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(given, ref, rtol=1e-4, atol=1e-5)
    assert torch.equal(ours[removed], down[removed])


def test_router_refit_error_is_exact_for_tokens_routed_outside_their_candidates():
    """The router refit's quadratic form (over each token's k+4 best kept experts) and its direct fallback give the
    layer's true error, also when the refitted router sends tokens outside those candidates."""
    g = torch.Generator().manual_seed(5)
    T, E, H, I = 300, 16, 8, 6
    x = torch.randn(T, H, generator=g)
    gate, up, down = (torch.randn(E, I, H, generator=g), torch.randn(E, I, H, generator=g),
                      torch.randn(E, H, I, generator=g))  # fmt: skip
    weight = torch.randn(E, H, generator=g)
    y0 = combine(outputs_by_token(x, gate, up, down), *route(x @ weight.T, SOFT))
    removed = torch.zeros(E, dtype=torch.bool)
    removed[[2, 7]] = True
    src, before = _layer_error(x, gate, up, down, weight, SOFT, removed, y0)
    rows, _, e0, e1 = refit_router(src, x, weight, None, SOFT, removed, y0, steps=40, lr=0.3)
    _, after = _layer_error(x, gate, up, down, rows, SOFT, removed, y0)
    assert e0 == pytest.approx(before, rel=1e-5) and after == pytest.approx(e1, rel=1e-4) and e1 < e0
    cand = (x @ weight.T).masked_fill(removed, float("-inf")).topk(6, dim=1).indices
    idx = route(x @ rows.T, SOFT, removed)[1]
    assert not bool((idx[:, :, None] == cand[:, None, :]).any(2).all()), "no token left its candidates"


def test_cached_activations_give_the_same_outputs_and_the_true_activations():
    """ExpertOutputs(hidden=True) returns bit for bit the outputs of the plain cache, also for pairs computed on demand
    into removed experts' slots, and hidden_of is each expert's activation on cached and uncached tokens alike (to
    float rounding: a matmul may round differently for another batch of rows)."""
    x, gate, up, down, logits, _ = _experts(11, T=200, E=8, H=6, I=5)
    plain, cached = (ExpertOutputs(x, gate, up, down, logits, 3, hidden=h) for h in (False, True))
    for src in (plain, cached):
        src.release(int(logits.argmax(1)[0]))
    rows = torch.arange(200)
    idx = logits.topk(6, dim=1).indices  # beyond the 3 cached: computed on demand, some kept in freed slots
    assert torch.equal(cached.get(rows, idx), plain.get(rows, idx))
    assert torch.equal(cached.get(rows, idx), plain.get(rows, idx))  # again, now partly from the freed slots
    for e in range(8):
        want = expert_hidden(x, gate[e], up[e], torch.nn.functional.silu)
        torch.testing.assert_close(cached.hidden_of(e, rows), want)  # rounding may differ with the row batch
        torch.testing.assert_close(plain.hidden_of(e, rows), want)
    assert bool((cached.slot >= 0).any()) and bool((cached.slot < 0).any())


@pytest.mark.parametrize("t", [4, 40], ids=["fewer-rows", "more-rows"])
def test_ridge_step_is_the_ridge_solution(t):
    """Both forms of the ridge step (a^T a or a a^T inverted) equal (a^T a + lam)^-1 a^T r in float64."""
    g = torch.Generator().manual_seed(t)
    a, r = torch.randn(t, 10, generator=g, dtype=torch.float64), torch.randn(t, 7, generator=g, dtype=torch.float64)
    lam = 1e-2 * float((a.T @ a).diagonal().mean())
    want = torch.linalg.solve(a.T @ a + lam * torch.eye(10, dtype=torch.float64), a.T @ r)
    torch.testing.assert_close(ridge_step(a.float(), r.float(), 1e-2).double(), want, rtol=1e-4, atol=1e-5)


def _pruned_pair(T: int):
    """Experts 1 and 6 of 8 removed: (x, gate, up, down, removed, kept, y0, w_p, idx_p, y_new, src) with y0 the
    original routed output and y_new the pruned layer's with the original down projections."""
    x, gate, up, down, logits, _ = _experts(12, T=T, E=8, H=6, I=5)
    removed = torch.zeros(8, dtype=torch.bool)
    removed[[1, 6]] = True
    kept = [e for e in range(8) if not removed[e]]
    dense = outputs_by_token(x, gate, up, down)
    y0 = combine(dense, *route(logits, SOFT))
    w_p, idx_p = route(logits, SOFT, removed)
    y_new = combine(dense, w_p, idx_p)
    src = ExpertOutputs(x, gate, up, down, logits, 4, hidden=True)
    return x, gate, up, down, removed, kept, y0, w_p, idx_p, y_new, src


def test_fit_downs_returns_the_refitted_layer_output():
    """fit_downs' running output is the pruned layer's routed output recomputed with the new down projections, and
    the refit lowers the error to the original output."""
    x, gate, up, down, removed, kept, y0, w_p, idx_p, y_new, src = _pruned_pair(300)
    new, y = fit_downs(src.hidden_of, down, kept, dense_weights(w_p, idx_p, 8), y0, y_new)
    assert torch.equal(new[removed], down[removed]) and not torch.equal(new[kept], down[kept])
    torch.testing.assert_close(y, combine(outputs_by_token(x, gate, up, new), w_p, idx_p), rtol=1e-4, atol=1e-4)
    assert float((y - y0).pow(2).sum()) < 0.9 * float((y_new - y0).pow(2).sum())
    # kept_only: the kept experts' rows alone, float32, in the order of ``kept`` (a bf16 layer needs no float32 copy)
    only, y2 = fit_downs(src.hidden_of, down.bfloat16(), kept, dense_weights(w_p, idx_p, 8), y0, y_new, kept_only=True)
    assert only.dtype == torch.float32 and only.shape == (len(kept), *down.shape[1:])
    full, y3 = fit_downs(src.hidden_of, down.bfloat16().float(), kept, dense_weights(w_p, idx_p, 8), y0, y_new)
    assert torch.equal(only, full[kept]) and torch.equal(y2, y3)


def test_the_default_refit_is_down_after_output_error_and_none_after_score_methods():
    """issue 14: output-error pruning refits the kept down projections by default; the score methods (which use the
    model's own routing and work on every model type) keep none; an explicit refit is kept as given."""
    assert PruneOptions(ratio=0.25).refit == "down"
    assert PruneOptions(ratio=0.25, method="output-error", refit="none").refit == "none"
    for method in ("reap", "frequency", "routing-mass", "random"):
        assert PruneOptions(ratio=0.25, method=method).refit == "none"
    assert PruneOptions(ratio=0.25, method="reap", refit="down").refit == "down"


def test_fit_downs_hold_out_check_and_minimum_rows():
    """With a hold-out, each accepted refit lowers the error on the held-out tokens (so their total never grows)
    and a rejected one leaves its expert as it was; an expert with fewer fit tokens than ``min_rows`` x its width
    is not refitted."""
    x, gate, up, down, removed, kept, y0, w_p, idx_p, y_new, src = _pruned_pair(120)
    wd = dense_weights(w_p, idx_p, 8)
    new, y = fit_downs(src.hidden_of, down, kept, wd, y0, y_new, holdout=2)
    check = torch.zeros(120, dtype=torch.bool)
    check[::2] = True
    err = lambda yy: float((yy - y0)[check].double().pow(2).sum())  # noqa: E731
    assert err(y) <= err(y_new)
    torch.testing.assert_close(y, combine(outputs_by_token(x, gate, up, new), w_p, idx_p), rtol=1e-4, atol=1e-4)
    same, y2 = fit_downs(src.hidden_of, down, kept, wd, y0, y_new, holdout=2, min_rows=1e9)
    assert torch.equal(same, down)
    torch.testing.assert_close(y2, y_new.float())


def test_cache_slots_bound_the_search_cache_by_the_layer_and_max_memory():
    """k+4 slots unless they take more than max(256 MiB, half the layer's routed experts) or a quarter of
    --max-memory: the DeepSeek-V3-dims slice (4,096 tokens, H 7168, width 2048, 16 experts in bf16) holds 4 slots of
    its 12, the Qwen3-30B-shaped layer and the small synthetic ones all 12."""
    layer = lambda E, H, I: E * 3 * H * I * 2  # noqa: E731 - bf16 gate, up, down
    slot = lambda T, H, I: T * (H + I) * 4  # noqa: E731 - outputs + activations, float32
    assert cache_slots(12, slot(4096, 7168, 2048), layer(16, 7168, 2048)) == 4
    assert cache_slots(12, slot(4096, 2048, 768), layer(128, 2048, 768)) == 12
    assert cache_slots(12, slot(4096, 512, 256), layer(16, 512, 256)) == 12  # the 256 MiB floor
    assert cache_slots(12, slot(4096, 512, 256), layer(16, 512, 256), limit=4 * 3 * slot(4096, 512, 256)) == 3
    assert cache_slots(12, slot(4096, 7168, 2048), layer(16, 7168, 2048), limit=1) == 1  # never fewer than one
    with pytest.raises(ValueError, match="must be positive"):
        cache_slots(0, 1, 1)


@pytest.mark.parametrize("spec", SPECS, ids=["softmax", "softmax-no-norm", "groups", "groups-topk2"])
def test_greedy_with_one_cached_slot_equals_the_full_cache(spec):
    """The search makes the same choices with the same costs whatever the cache holds (one slot per token: almost
    every pair is computed when asked for; k+4: the default), and the refit's activations are the same."""
    x, gate, up, down, logits, corr = _experts(5, T=300, H=24, I=16)
    corr = corr if spec.kind != "softmax" else None
    n = 6 if spec.n_group == 1 else 4
    runs, hidden = [], []
    for c in (1, spec.top_k + 4):
        src = ExpertOutputs(x, gate, up, down, router_choice(logits, spec, corr), c, hidden=True)
        runs.append([(s.experts, s.cost) for s in output_error_order(src, logits, spec, set(), n, corr)])
        hidden.append(torch.stack([src.hidden_of(e, torch.arange(300)) for e in range(8)]))
    assert len(runs[0]) == n // spec.n_group
    assert [s[0] for s in runs[0]] == [s[0] for s in runs[1]]
    assert [s[1] for s in runs[0]] == pytest.approx([s[1] for s in runs[1]], rel=1e-6, abs=1e-12)
    torch.testing.assert_close(hidden[0], hidden[1])


class _OneByOne:
    """The cache without ``planned``: every get computes its own misses (the search's path before PlannedGets)."""

    def __init__(self, src):
        self.src, self.slots = src, src.slots

    def get(self, rows, idx):
        return self.src.get(rows, idx)

    def release(self, e):
        self.src.release(e)


@pytest.mark.parametrize("spec", SPECS, ids=["softmax", "softmax-no-norm", "groups", "groups-topk2"])
@pytest.mark.parametrize("hidden", [False, True], ids=["outputs", "hidden"])
@pytest.mark.parametrize("plan_bytes", [1, 1 << 30], ids=["call-per-group", "one-group"])
def test_planned_misses_give_the_search_bit_for_bit(monkeypatch, spec, hidden, plan_bytes):
    """A cache below k+1 slots answers the search's refresh calls a group at a time (PlannedGets: each missed expert
    upcast once per group): the same order and costs bit for bit, the same pairs kept with the same values."""
    import moecompress.prune.order as order

    monkeypatch.setattr(order, "TRIAL_ELEMENTS", 200)  # several parts and trial chunks per refresh
    monkeypatch.setattr(order, "REFRESH_ELEMENTS", 400)
    monkeypatch.setattr(order, "PLAN_BYTES", plan_bytes)
    x, gate, up, down, logits, corr = _experts(5)
    corr = corr if spec.kind != "softmax" else None
    n = 6 if spec.n_group == 1 else 4
    runs, srcs, planned = [], [], []
    real = ExpertOutputs.planned
    monkeypatch.setattr(ExpertOutputs, "planned", lambda self, calls: planned.append(len(calls)) or real(self, calls))
    for one_by_one in (False, True):
        src = ExpertOutputs(x, gate, up, down, router_choice(logits, spec, corr), 1, hidden=hidden)
        got = output_error_order(_OneByOne(src) if one_by_one else src, logits, spec, set(), n, corr)
        runs.append([(s.experts, s.cost) for s in got])
        srcs.append(src)
    assert planned and max(planned) > 1  # the planned path ran, with several calls per plan
    assert runs[0] == runs[1] and len(runs[0]) == n // spec.n_group
    a, b = srcs
    assert torch.equal(a.slot, b.slot) and torch.equal(a.owner, b.owner) and torch.equal(a.cache, b.cache)
    assert (a.hcache is None) == (not hidden) and (not hidden or torch.equal(a.hcache, b.hcache))
    plan = a.planned([(torch.arange(3), torch.zeros(3, 1, dtype=torch.long))])
    with pytest.raises(RuntimeError, match="other than the planned"):
        plan.get(torch.arange(2), torch.zeros(2, 1, dtype=torch.long))


@pytest.mark.parametrize("slots", [1, 6], ids=["bounded-cache", "full-cache"])
@pytest.mark.parametrize("hidden", [False, True], ids=["outputs", "hidden"])
def test_layer_output_in_small_chunks_is_the_routed_output_bit_for_bit(monkeypatch, slots, hidden):
    """The whole-layer routed output in byte-bounded chunks (through ``planned`` when the cache is bounded) equals
    one ``routed_output`` over every row (the chunk rule and the bookkeeping change nothing: the same values, the
    same pairs kept in the cache)."""
    import moecompress.prune.order as order

    assert routed_chunk(8, 7168) == 292 and routed_chunk(8, 512) == order.ROUTED_CHUNK == 1024
    monkeypatch.setattr(order, "ROUTED_CHUNK", 30)  # calls of 30 rows (a short last one), answered 7 rows at a time
    monkeypatch.setattr(order, "ROUTED_BYTES", 7 * 2 * 24 * 4)
    monkeypatch.setattr(order, "PLAN_BYTES", 600)  # several planned groups
    x, gate, up, down, logits, _ = _experts(5, T=100, H=24, I=16)
    w, idx = route(logits, SOFT, None, None)
    srcs, outs = [], []
    for whole in (True, False):
        src = ExpertOutputs(x, gate, up, down, router_choice(logits, SOFT, None), slots, hidden=hidden)
        if whole:
            outs.append(routed_output(src, torch.arange(100), w, idx, chunk=30))
        else:
            outs.append(layer_output(src, w, idx))
        srcs.append(src)
    assert torch.equal(outs[0], outs[1]) and outs[1].shape == (100, 24)
    a, b = srcs
    assert torch.equal(a.slot, b.slot) and torch.equal(a.owner, b.owner) and torch.equal(a.cache, b.cache)
    assert not hidden or torch.equal(a.hcache, b.hcache)
    assert routed_chunk(2, 24) == 7


def test_fit_downs_when_every_token_fits_is_the_copying_fit_bit_for_bit():
    """Every token routed to every kept expert (8 of 16 kept at top-8) and no hold-out: the fit reads the residual
    and the activations without copying their rows; the downs and the output are those of the copied rows."""
    g = torch.Generator().manual_seed(7)
    T, E, H, I = 96, 4, 16, 8
    down = torch.randn(E, H, I, generator=g)
    kept = [0, 2]
    w = torch.zeros(T, E)
    w[:, kept] = torch.rand(T, 2, generator=g) + 0.1
    w[5, 2] = 0.0  # expert 2 misses a token: its rows are gathered (the copying path)
    hs = torch.randn(E, T, I, generator=g)
    y0, yn = torch.randn(T, H, generator=g), torch.randn(T, H, generator=g)
    got, y = fit_downs(lambda e, rows: hs[e][rows], down, kept, w, y0, yn, kept_only=True)
    resid, ref = y0 - yn, torch.empty(2, H, I)
    for j, e in enumerate(kept):  # the fit as it was: rows copied
        on = (w[:, e] > 0).nonzero().squeeze(1)
        a = w[on, e, None] * hs[e][on]
        ref[j] = down[e] + ridge_step(a[torch.ones(on.numel(), dtype=torch.bool)], resid[on]).T
        resid.index_add_(0, on, a @ (ref[j] - down[e]).T, alpha=-1.0)
    assert torch.equal(got, ref) and torch.equal(y, y0 - resid)


def test_sq_error_in_row_blocks_matches_the_whole_sum(monkeypatch) -> None:
    """Past SQ_ERROR_BLOCK_BYTES the squared error (and a tensor's energy) is summed a block of rows at a time (no
    [T, H] float64 copy): the same value to rounding; at or under it, bit for bit."""
    from moecompress.prune import transform as T

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(301, 64, generator=g), torch.randn(301, 64, generator=g)
    ref = float((a.double() - b.double()).pow(2).sum())
    assert T._sq_error(a, b) == ref
    monkeypatch.setattr(T, "SQ_ERROR_BLOCK_BYTES", 8 * 64 * 7)  # 7 rows per block, 43 blocks
    assert T._sq_error(a, b) == pytest.approx(ref, rel=1e-13) and T._sq_error(a, a) == 0.0
    energy = float(a.double().pow(2).sum())  # the reference output's energy: blocked the same way
    assert T._sq_sum(a) == pytest.approx(energy, rel=1e-13) and T._sq_sum(a[:7]) == float(a[:7].double().pow(2).sum())
