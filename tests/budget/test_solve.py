"""The byte-budget integer program agrees with brute force on small instances (budget/solve.py)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from moecompress.budget.options import Option, cut_width, expert_bytes, menu, option_bytes
from moecompress.budget.solve import Shape, servable_plan, smallest_bytes, solve


def _feasible(choice, shape: Shape, allowed) -> bool:
    choice = np.asarray(choice)
    if allowed is not None and not allowed[np.arange(len(choice)), choice].all():
        return False
    for l in np.unique(shape.layer):
        kept = (choice != 0) & (shape.layer == l)
        if kept.sum() < shape.min_keep:
            return False
        if shape.n_group > 1:
            per = [int((kept & (shape.group == g)).sum()) for g in np.unique(shape.group[shape.layer == l])]
            if len(set(per)) != 1 or per[0] < shape.per_group:
                return False
    return True


def _brute(costs, nbytes, budget, shape, allowed=None):
    best = None
    N, O = costs.shape
    for choice in itertools.product(range(O), repeat=N):
        b = nbytes[np.arange(N), choice].sum()
        if b > budget or not _feasible(choice, shape, allowed):
            continue
        c = costs[np.arange(N), choice].sum()
        if best is None or c < best[0] - 1e-12:
            best = (c, choice)
    return best


def _instance(rng, L, E, O):
    costs = rng.uniform(0, 1, (L * E, O))
    costs[:, 0] = rng.uniform(0.5, 3, L * E)  # removal: costly
    base = rng.integers(20, 40, O)
    base[0] = 0
    nbytes = np.tile(np.sort(base)[::1].astype(float), (L * E, 1))
    nbytes[:, 1:] = np.sort(rng.integers(10, 60, (L * E, O - 1)), axis=1)[:, ::-1]  # more bytes, less cost mostly
    costs[:, 1:] = np.sort(costs[:, 1:], axis=1)
    return costs, nbytes


@pytest.mark.parametrize("seed", range(3))
def test_the_integer_program_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    L, E, O = 2, 3, 3
    costs, nbytes = _instance(rng, L, E, O)
    shape = Shape(np.repeat(np.arange(L), E), np.zeros(L * E, dtype=int), min_keep=2)
    allowed = np.ones_like(costs, dtype=bool)
    allowed[1, 0] = False  # a super expert: never removed
    lo = smallest_bytes(nbytes, shape, allowed)
    budget = lo + rng.uniform(0.1, 0.9) * (nbytes.max(axis=1).sum() - lo)
    got = solve(costs, nbytes, budget, shape, allowed)
    ref = _brute(costs, nbytes, budget, shape, allowed)
    assert got.cost == pytest.approx(ref[0], rel=1e-9, abs=1e-9)
    assert got.nbytes <= budget and _feasible(got.choice, shape, allowed)
    assert got.choice[1] != 0
    cbc = solve(costs, nbytes, budget, shape, allowed, solver="PULP_CBC_CMD")  # pulp's path agrees
    assert cbc.cost == pytest.approx(got.cost, rel=1e-9, abs=1e-9) and cbc.solver == "PULP_CBC_CMD"
    # the smallest reachable size is what brute force finds with cost = bytes
    assert lo == pytest.approx(_brute(nbytes, nbytes, np.inf, shape, allowed)[0])
    with pytest.raises(ValueError, match="budget"):
        solve(costs, nbytes, lo - 1, shape, allowed)


def test_group_routers_keep_the_same_count_in_every_group():
    rng = np.random.default_rng(7)
    L, E, O = 1, 6, 3
    costs, nbytes = _instance(rng, L, E, O)
    costs[:, 0] = 0.01  # removal is cheap: only the constraints hold experts
    shape = Shape(np.zeros(E, dtype=int), np.arange(E) // 3, min_keep=2, n_group=2, per_group=2)
    got = solve(costs, nbytes, 1e9, shape)
    ref = _brute(costs, nbytes, 1e9, shape)
    assert got.cost == pytest.approx(ref[0])
    assert solve(costs, nbytes, 1e9, shape, solver="PULP_CBC_CMD").cost == pytest.approx(ref[0])
    kept = got.choice != 0
    assert kept[:3].sum() == kept[3:].sum() == 2


def _servable_brute(costs, per, budget, E, L, width_of, min_keep=2):
    """Every plan with one expert count for the model and one kept option per layer, all of one width."""
    best = None
    for K in range(min_keep, E + 1):
        for opts in itertools.product(sorted(width_of), repeat=L):
            if len({width_of[o] for o in opts}) > 1 or K * sum(per[o] for o in opts) > budget:
                continue
            c = 0.0
            for l in range(L):  # every set of K kept experts
                c += min(sum(costs[l, e, opts[l] if e in keep else 0] for e in range(E))
                         for keep in itertools.combinations(range(E), K))  # fmt: skip
            best = c if best is None or c < best else best
    return best


@pytest.mark.parametrize("seed", range(4))
def test_the_servable_plan_is_the_best_count_width_and_bits_per_layer(seed):
    """One expert count and one width for the model, one option (bits) per layer: the best such plan (brute
    force over counts, per-layer options and kept experts), within the budget."""
    rng = np.random.default_rng(seed)
    L, E, O = 3, 4, 5
    costs = rng.uniform(0, 1, (L, E, O))
    per = np.array([0, 30, 20, 10.0, 15.0])
    nbytes = np.broadcast_to(per, (L, E, O)).copy()
    shape = Shape(np.repeat(np.arange(L), E), np.zeros(L * E, dtype=int), min_keep=2)
    width_of = {1: 0, 2: 0, 3: 0, 4: 1}  # option 4 is another channel width: never mixed with 1-3
    budget = rng.uniform(60, 300)
    got = servable_plan(costs, nbytes, budget, shape, kept_options=[1, 2, 3, 4], width_of=width_of)
    assert got.cost == pytest.approx(_servable_brute(costs, per, budget, E, L, width_of))
    ch = got.choice.reshape(L, E)
    assert got.nbytes <= budget and len({int((r != 0).sum()) for r in ch}) == 1
    assert len({width_of[int(o)] for o in ch[ch != 0]}) == 1 and all(len(set(r[r != 0].tolist())) == 1 for r in ch)
    one = servable_plan(costs, nbytes, budget, shape, kept_options=[1, 2, 3])  # bits per layer: never worse
    assert got.cost <= one.cost + 1e-12


def test_the_servable_plan_keeps_never_removed_experts_and_groups_even():
    rng = np.random.default_rng(3)
    L, E, O = 2, 6, 3
    costs = rng.uniform(0, 1, (L, E, O))
    costs[:, :, 0] = 0.001  # removal is cheap: only the constraints keep experts
    nbytes = np.broadcast_to(np.array([0, 20, 10.0]), (L, E, O)).copy()
    allowed = np.ones((L, E, O), dtype=bool)
    allowed[1, 4, 0] = False  # a super expert
    shape = Shape(np.repeat(np.arange(L), E), np.tile(np.arange(E) // 3, L), min_keep=2, n_group=2, per_group=1)
    got = servable_plan(costs, nbytes, 1e9, shape, allowed)
    ch = got.choice.reshape(L, E)
    assert ch[1, 4] != 0 and (ch[:, :3] != 0).sum(1).tolist() == (ch[:, 3:] != 0).sum(1).tolist()
    assert len({int((r != 0).sum()) for r in ch}) == 1 and (ch != 0).sum(1)[0] == 2


def test_option_bytes_follow_quant_accounting():
    assert cut_width(128, 0.75) == 96 and cut_width(128, 0.5) == 64 and cut_width(24, 0.5) == 16
    opts = menu(128)
    assert opts[0].removed and len(opts) == 1 + 3 * 16  # quantize's 16 (gate/up, down) options at each width
    assert {o.pair for o in opts[1:]} == {(bg, bd) for bg in (2, 3, 4, 8) for bd in (2, 3, 4, 8)}
    assert len(menu(128, options=(2, 3, 4, 8))) == 13 and all(o.uniform for o in menu(128, options=(2, 8))[1:])
    # 4 bits, H=256, I=64, group 64 (gcd): packed int32 + bf16 scales + 2 int64 shape per projection
    g = 64
    one = 2 * (64 * (256 * 4 // 32) * 4 + 64 * (256 // g) * 2 + 16) + (
        256 * (64 * 4 // 32) * 4 + 256 * (64 // g) * 2 + 16
    )
    assert expert_bytes(256, 64, 4, 2) == expert_bytes(256, 64, (4, 4), 2) == one
    assert option_bytes(Option("remove"), 256, 2, 512) == 0
    assert option_bytes(Option("keep", 64, 4, 0.5), 256, 2, 512) == one + 512
    # a pair: gate/up at 2 bits, down_proj at 8 (3 bits per weight on average)
    pair = 2 * (64 * (256 * 2 // 32) * 4 + 64 * (256 // g) * 2 + 16) + (
        256 * (64 * 8 // 32) * 4 + 256 * (64 // g) * 2 + 16
    )
    o = Option("keep", 64, 2, 0.5, 8)
    assert o.label() == "50%@2/8b" and o.average_bits == 4 and o.quant_width == (2, 8)
    assert expert_bytes(256, 64, (2, 8), 2) == pair and option_bytes(o, 256, 2, 512) == pair + 512
