"""The global bit-allocation ILP."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

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
    with pytest.raises(ValueError, match="below the smallest possible"):
        allocate_bits(costs, nbytes, nbytes[:, 0].sum() - 1)
    with pytest.raises(ValueError, match="below the smallest possible"):
        allocate_bits(costs, nbytes, nbytes[:, 0].sum() - 1, groups_for_layer_constraint=np.zeros(6, dtype=int))


def test_cbc_fallback_agrees_with_highs():
    costs, nbytes = _instance(10, n=40)
    budget = nbytes[:, 1].sum()
    a = allocate_bits_detailed(costs, nbytes, budget, solver="HiGHS")
    b = allocate_bits_detailed(costs, nbytes, budget, solver="PULP_CBC_CMD")
    assert a.solver == "HiGHS" and b.solver == "PULP_CBC_CMD"
    assert a.cost == pytest.approx(b.cost, rel=1e-6)


def test_allowed_choices_are_respected_and_optimal():
    costs, nbytes = _instance(11)
    budget = nbytes[:, 2].sum()  # uniform 4-bit bytes
    allowed = np.ones(costs.shape, dtype=bool)
    allowed[2, :3] = False  # item 2 may only take the last (8-bit) choice
    got = allocate_bits_detailed(costs, nbytes, budget, allowed=allowed)
    assert got.choice[2] == 3
    best = _brute(np.where(allowed, costs, 1e9), nbytes, budget)[0]
    assert got.cost == pytest.approx(best, rel=1e-9)


def _fake_plan(err, counts, probe_kl=None, supers=(), granularity="expert", bits=3.0, cost_model="kl"):
    from moecompress.quant.run import make_plan

    L, E, _ = err.shape

    class Lay:
        moe = list(range(L))
        I, H = 8, 16

        def expert_bytes(self, b, sb):
            return 3 * self.I * self.H * b / 8 + 10

        def fixed_bytes(self, ob, sb):
            return 0

    Lay.E = E
    meas = {"err": err, "counts": counts, "probe_kl": probe_kl, "used": {l: ["gptq"] * E for l in range(L)}}
    return make_plan(
        Lay(), meas, (2, 3, 4, 8), "lp", bits, None, granularity, 16, 2, np.ones((L, E)), 32, cost_model, True,
        list(supers),
    )  # fmt: skip


def _errs(L=3, E=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.lognormal(size=(L, E, 1)) * 4.0 ** -np.array([2, 3, 4, 8])[None, None, :]


def test_super_and_low_token_experts_get_8_bits_and_the_plan_says_so():
    err = _errs()
    counts = np.full((3, 4), 500)
    counts[1, 2] = 3  # too few tokens
    for gran in ("expert", "layer"):
        plan = _fake_plan(err, counts, supers=[(0, 1)], granularity=gran, bits=4.0)
        bits = {(int(l), r["expert"]): r["bits"] for l, d in plan["layers"].items() for r in d["experts"]}
        assert bits[(0, 1)] >= 8 and bits[(1, 2)] >= 8
        reasons = {(l, e): why for l, e, why in plan["protected"]}
        assert reasons[(0, 1)] == "super expert" and "fewer than 32" in reasons[(1, 2)]
        assert "8 bits" in plan["protect_rule"]
        assert plan["routed_bytes"] <= plan["budget_bytes_routed"]
        if gran == "layer":  # the others of a layer still share one width
            for l in range(3):
                rest = {b for (ll, e), b in bits.items() if ll == l and (ll, e) not in reasons}
                assert len(rest) == 1


def test_kl_cost_sums_to_measured_layer_kl_at_the_lowest_probe_and_is_monotone_in_bits():
    err = _errs(seed=1)
    counts = np.full((3, 4), 500)
    probe = {(l, b): f * (l + 1) for l in range(3) for b, f in ((2, 0.4), (3, 0.1), (4, 0.02))}
    plan = _fake_plan(err, counts, probe_kl=probe)
    assert plan["cost_model"] == "kl"
    sens = plan["sensitivity"]
    for l in range(3):  # one factor per layer: its summed cost at the lowest probed width is its measured KL
        assert sens[str(l)] * err[l, :, 0].sum() == pytest.approx(probe[(l, 2)])
        for e in range(4):  # per-expert cost never rises with more bits
            c = [sens[str(l)] * err[l, e, j] for j in range(4)]
            assert c == sorted(c, reverse=True)
    # a layer 10x as sensitive gets more bits than the plain error cost gives it
    probe2 = {(l, b): v * (10 if l == 2 else 1) for (l, b), v in probe.items()}
    p_kl = _fake_plan(err, counts, probe_kl=probe2)
    p_err = _fake_plan(err, counts, cost_model="err")
    avg = lambda p, l: np.mean([r["bits"] for r in p["layers"][str(l)]["experts"]])  # noqa: E731
    assert avg(p_kl, 2) > avg(p_err, 2)


def _mcknap(n=400, seed=0):
    rng = np.random.default_rng(seed)
    nbytes = np.tile(np.array([1.0, 1.5, 2.0, 4.0]), (n, 1)) * 1000 + rng.integers(0, 50, (n, 4))
    costs = np.sort(rng.random((n, 4)), axis=1)[:, ::-1] * rng.random((n, 1))
    return costs, nbytes, nbytes[:, 1].sum()


@pytest.mark.parametrize("status", [-1, 0])  # CBC at its time limit: "Infeasible" or "Not Solved", no solution
def test_solver_stopped_at_its_time_limit_is_not_reported_infeasible(monkeypatch, status):
    import pulp

    def stopped(self, solver=None, **kw):
        self.status, self.sol_status = status, pulp.LpSolutionNoSolutionFound
        return status

    monkeypatch.setattr(pulp.LpProblem, "solve", stopped)
    costs, nbytes, budget = _mcknap(20)
    with pytest.raises(
        ValueError, match=r"reached its 0 s time limit without a plan; install HiGHS \(pip install highspy"
    ):
        allocate_bits_detailed(costs, nbytes, budget, solver="PULP_CBC_CMD", time_limit_s=0.0)
    with pytest.raises(ValueError, match="stopped with status") as err:
        allocate_bits_detailed(costs, nbytes, budget, solver="PULP_CBC_CMD", time_limit_s=1e9)
    assert "budget" not in str(err.value) and "highspy" in str(err.value)  # no advice that does not apply


def test_real_cbc_time_limit_says_so():
    costs, nbytes, budget = _mcknap()
    try:
        res = allocate_bits_detailed(costs, nbytes, budget, solver="PULP_CBC_CMD", time_limit_s=0.01)
    except ValueError as err:
        assert "time limit" in str(err) and "highspy" in str(err) and "infeasible" not in str(err).lower()
    else:  # solved (or a feasible plan at the limit) within 0.01 s: the plan must hold the budget
        assert res.nbytes <= budget and (res.status == "Optimal" or "time limit" in res.status)
