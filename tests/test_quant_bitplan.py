"""The global bit-allocation ILP."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from moecompress.errors import UserError
from moecompress.quant.bitplan import allocate_bits, allocate_bits_detailed


def _brute(costs, nbytes, budget, groups=None):
    n, b = costs.shape
    best, arg = np.inf, None
    for combo in itertools.product(range(b), repeat=n):
        combo = np.array(combo)
        if groups is not None and any(len(set(combo[groups == g])) > 1 for g in np.unique(groups)):
            continue
        if nbytes[np.arange(n), combo].sum() <= budget:
            c = costs[np.arange(n), combo].sum()
            if c < best:
                best, arg = c, combo
    return best, arg


def _instance(seed, n=6):
    rng = np.random.default_rng(seed)
    bits = np.array([2, 3, 4, 8])
    size = rng.integers(50, 200, size=(n, 1))
    nbytes = size * bits[None, :] + 10.0
    costs = rng.lognormal(size=(n, 1)) * 4.0 ** -bits[None, :] * rng.lognormal(0, 0.3, size=(n, 4))
    return costs, nbytes.astype(float)


@pytest.mark.parametrize("seed", range(4))
def test_matches_brute_force(seed):
    costs, nbytes = _instance(seed)
    budget = nbytes[:, 1].sum()  # uniform 3-bit bytes
    choice = allocate_bits(costs, nbytes, budget)
    best, _ = _brute(costs, nbytes, budget)
    got = costs[np.arange(len(choice)), choice].sum()
    assert nbytes[np.arange(len(choice)), choice].sum() <= budget
    assert got == pytest.approx(best, rel=1e-6)
    assert got <= costs[:, 1].sum() + 1e-12  # never worse than the uniform plan of the same bytes


def test_layer_constraint_ties_widths_and_is_optimal():
    costs, nbytes = _instance(7)
    groups = np.array([0, 0, 0, 1, 1, 1])
    budget = nbytes[:, 1].sum() + 30
    choice = allocate_bits(costs, nbytes, budget, groups_for_layer_constraint=groups)
    assert len(set(choice[:3])) == 1 and len(set(choice[3:])) == 1
    best, _ = _brute(costs, nbytes, budget, groups)
    assert costs[np.arange(6), choice].sum() == pytest.approx(best, rel=1e-6)


def test_generous_budget_takes_cheapest_cost_and_tight_budget_smallest():
    costs, nbytes = _instance(8)
    assert list(allocate_bits(costs, nbytes, 1e12)) == list(costs.argmin(axis=1))
    assert list(allocate_bits(costs, nbytes, nbytes.min(axis=1).sum())) == list(nbytes.argmin(axis=1))


def test_refusals():
    costs, nbytes = _instance(9)
    with pytest.raises(UserError, match="below the smallest possible"):
        allocate_bits(costs, nbytes, nbytes[:, 0].sum() - 1)
    with pytest.raises(UserError, match="below the smallest possible"):
        allocate_bits(costs, nbytes, nbytes[:, 0].sum() - 1, groups_for_layer_constraint=np.zeros(6, dtype=int))


def test_cbc_fallback_agrees_with_highs():
    costs, nbytes = _instance(10, n=40)
    budget = nbytes[:, 1].sum()
    a = allocate_bits_detailed(costs, nbytes, budget, solver="HiGHS")
    b = allocate_bits_detailed(costs, nbytes, budget, solver="PULP_CBC_CMD")
    assert a.solver == "HiGHS" and b.solver == "PULP_CBC_CMD"
    assert a.cost == pytest.approx(b.cost, rel=1e-6)
