"""The byte-budget integer program (pure: arrays in, choice out; raises ValueError).

Items n = routed experts (layer ``layer[n]``, router group ``group[n]``); options o = 0 (remove) or a kept
(width, bits). Binary x[n, o]:

    minimize    sum c[n, o] x[n, o]
    subject to  sum_o x[n, o] = 1                                   (one option per expert)
                sum bytes[n, o] x[n, o] <= budget                   (bytes of the routed experts; the rest is fixed)
                sum_{n in l} (1 - x[n, 0]) >= min_keep              (every layer can still route its top-k)
                group routers: every group of a layer keeps the same number of experts, at least ``per_group``
                x[n, o] = 0 where not ``allowed`` (super experts: never removed)

Within an item, kept options that another kept option dominates (no more bytes, no higher cost) are dropped
before solving (exact: constraints treat every kept option alike); removal is always a variable. Solved by HiGHS
when pulp has it (highspy), CBC otherwise. ``servable_plan`` solves the servable variant exactly by enumeration
(one expert count, one width and one bit width for every layer: bytes no longer depend on which experts are
kept, so each (count, width, bits) has its best experts by sorting).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from ..quant.bitplan import _available_solver, _new_var, _quiet_stdout


@dataclass
class Solution:
    choice: np.ndarray  # [N] option index
    cost: float
    nbytes: float
    solver: str
    solve_s: float
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Shape:
    """The constraint structure of an instance: ``layer [N]`` and ``group [N]`` per item, the router's minimum
    number of kept experts per layer and, for group routers (n_group > 1), per group."""

    layer: np.ndarray
    group: np.ndarray
    min_keep: int
    n_group: int = 1
    per_group: int = 1


def _check(costs: np.ndarray, nbytes: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
    if costs.shape != nbytes.shape or costs.ndim != 2 or costs.shape[1] < 2:
        raise ValueError("costs and nbytes must both be [N, O] with O >= 2 (option 0 removes the item)")
    if not np.isfinite(costs).all() or not np.isfinite(nbytes).all():
        raise ValueError("costs and bytes must be finite")
    ok = np.ones(costs.shape, dtype=bool) if allowed is None else np.asarray(allowed, dtype=bool)
    if ok.shape != costs.shape or not ok[:, 1:].any(axis=1).all():
        raise ValueError("allowed must be [N, O] with at least one kept option per item")
    return ok


def _kept_options(costs: np.ndarray, nbytes: np.ndarray, ok: np.ndarray) -> list[np.ndarray]:
    """Per item, the kept options on its Pareto front (fewer bytes must mean strictly higher cost)."""
    out = []
    for n in range(costs.shape[0]):
        ks = np.where(ok[n, 1:])[0] + 1
        order = ks[np.lexsort((costs[n, ks], nbytes[n, ks]))]
        best, kept = np.inf, []
        for j in order:
            if costs[n, j] < best:
                kept.append(j)
                best = costs[n, j]
        out.append(np.array(kept, dtype=np.int64))
    return out


def _problem(costs, nbytes, ok, shape: Shape, budget: float | None, objective: str):
    """The pulp problem; ``objective`` "cost" (with the budget row) or "bytes" (the smallest model)."""
    import pulp

    prob = pulp.LpProblem("budget", pulp.LpMinimize)
    kept = _kept_options(costs, nbytes, ok)
    if objective == "bytes":  # smallest model: each item's cheapest kept option is enough
        kept = [ks[np.argsort(nbytes[n, ks], kind="stable")[:1]] for n, ks in enumerate(kept)]
    val = nbytes if objective == "bytes" else costs
    xs: list[list[tuple[int, object]]] = []
    obj: dict = {}
    budget_terms: dict = {}
    keep_terms: dict[int, list] = {}
    group_terms: dict[tuple[int, int], list] = {}
    for n, ks in enumerate(kept):
        row = []
        if ok[n, 0]:
            row.append((0, _new_var(prob, f"r_{n}")))
        row += [(int(j), _new_var(prob, f"x_{n}_{j}")) for j in ks]
        xs.append(row)
        prob += pulp.LpAffineExpression([(v, 1.0) for _, v in row]) == 1, f"one_{n}"
        for j, v in row:
            if val[n, j]:
                obj[v] = float(val[n, j])
            if j and nbytes[n, j]:
                budget_terms[v] = float(nbytes[n, j])
            if j:
                keep_terms.setdefault(int(shape.layer[n]), []).append((v, 1.0))
                group_terms.setdefault((int(shape.layer[n]), int(shape.group[n])), []).append((v, 1.0))
    prob += pulp.LpAffineExpression(obj) if obj else pulp.LpAffineExpression()
    if budget is not None:
        prob += pulp.LpAffineExpression(budget_terms) <= float(budget), "budget"
    for l, terms in keep_terms.items():
        prob += pulp.LpAffineExpression(terms) >= shape.min_keep, f"keep_{l}"
    if shape.n_group > 1:
        for l in keep_terms:
            gs = sorted(g for ll, g in group_terms if ll == l)
            for g in gs:
                prob += pulp.LpAffineExpression(group_terms[(l, g)]) >= shape.per_group, f"group_{l}_{g}"
            for g in gs[1:]:
                diff = group_terms[(l, g)] + [(v, -c) for v, c in group_terms[(l, gs[0])]]
                prob += pulp.LpAffineExpression(diff) == 0, f"equal_{l}_{g}"
    return prob, xs


def _run(prob, solver: str | None, time_limit_s: float) -> tuple[str, str, float]:
    import pulp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        name, slv = _available_solver(solver)
    slv.timeLimit = time_limit_s
    t = time.perf_counter()
    with _quiet_stdout():
        prob.solve(slv)
    return name, pulp.LpStatus[prob.status], time.perf_counter() - t


def _read(xs) -> np.ndarray:
    choice = np.empty(len(xs), dtype=np.int64)
    for n, row in enumerate(xs):
        vals = [v.value() or 0.0 for _, v in row]
        choice[n] = row[int(np.argmax(vals))][0]
    return choice


def smallest_bytes(
    nbytes: np.ndarray, shape: Shape, allowed: np.ndarray | None = None, solver: str | None = None
) -> float:
    """The fewest routed-expert bytes any plan can reach (removals as far as the router and groups allow)."""
    ok = _check(np.zeros_like(nbytes, dtype=float), nbytes, allowed)
    prob, xs = _problem(np.zeros_like(nbytes, dtype=float), nbytes, ok, shape, None, "bytes")
    _, status, _ = _run(prob, solver, 60.0)
    if status != "Optimal":
        raise ValueError(f"no plan keeps {shape.min_keep} experts per layer within the allowed options ({status})")
    c = _read(xs)
    return float(nbytes[np.arange(len(c)), c].sum())


def solve(
    costs: np.ndarray,
    nbytes: np.ndarray,
    budget: float,
    shape: Shape,
    allowed: np.ndarray | None = None,
    solver: str | None = None,
    time_limit_s: float = 120.0,
) -> Solution:
    """The exact-layout plan (module docstring). ValueError("budget ...") when no plan fits."""
    costs = np.asarray(costs, dtype=np.float64)
    nbytes = np.asarray(nbytes, dtype=np.float64)
    ok = _check(costs, nbytes, allowed)
    t0 = time.perf_counter()
    prob, xs = _problem(costs, nbytes, ok, shape, budget, "cost")
    build_s = time.perf_counter() - t0
    name, status, solve_s = _run(prob, solver, time_limit_s)
    if status == "Infeasible":
        raise ValueError(f"budget of {budget:,.0f} bytes cannot hold the routed experts")
    if status != "Optimal":
        raise ValueError(f"the planner's solver ({name}) ended with status {status}: raise the budget or time limit")
    choice = _read(xs)
    total = float(nbytes[np.arange(len(choice)), choice].sum())
    if total > budget * (1 + 1e-9) + 1e-6:
        raise ValueError(f"solver returned a plan over budget ({total:,.0f} > {budget:,.0f} bytes)")
    return Solution(
        choice, float(costs[np.arange(len(choice)), choice].sum()), total, name, solve_s,
        {"build_s": round(build_s, 3), "binaries": sum(len(r) for r in xs), "full_binaries": int(costs.size)},
    )  # fmt: skip


def servable_plan(
    costs: np.ndarray,  # [L, E, O]
    nbytes: np.ndarray,  # [L, E, O] (bytes of a kept option do not depend on the expert)
    budget: float,
    shape: Shape,
    allowed: np.ndarray | None = None,
    kept_options: list[int] | None = None,
) -> Solution:
    """One expert count K, one kept option (width, bits) for every kept expert of every layer; per layer the K
    experts with the smallest cost of keeping them at that option relative to removing them (per group with group
    routers). Exact by enumeration over (K, option)."""
    t0 = time.perf_counter()
    L, E, O = costs.shape
    ok = np.ones(costs.shape, dtype=bool) if allowed is None else allowed
    must = ~ok[:, :, 0]  # [L, E] never removed
    layer_group = shape.group.reshape(L, E)
    g = max(shape.n_group, 1)
    best: tuple[float, int, int, np.ndarray] | None = None
    for o in kept_options or range(1, O):
        per = float(nbytes[0, 0, o])
        for K in range(shape.min_keep, E + 1):
            if K % g or K // g < (shape.per_group if g > 1 else 1):
                continue
            if L * K * per > budget * (1 + 1e-9) + 1e-6:
                continue
            total, chosen = 0.0, np.zeros((L, E), dtype=np.int64)
            feasible = True
            for l in range(L):
                delta = costs[l, :, o] - costs[l, :, 0]  # keeping e instead of removing it
                delta = np.where(must[l], -np.inf, delta)
                delta = np.where(ok[l, :, o], delta, np.inf)
                keep: list[int] = []
                for grp in range(g):
                    members = np.where(layer_group[l] == grp)[0] if g > 1 else np.arange(E)
                    order = members[np.argsort(delta[members], kind="stable")]
                    take = order[: K // g]
                    if np.isposinf(delta[take]).any() or must[l, order[K // g :]].any():
                        feasible = False
                    keep += take.tolist()
                chosen[l, keep] = o
                total += float(costs[l, np.arange(E), chosen[l]].sum())
            if feasible and (best is None or total < best[0]):
                best = (total, K, o, chosen)
    if best is None:
        raise ValueError(f"budget of {budget:,.0f} bytes cannot hold the routed experts with one layout per model")
    total, K, o, chosen = best
    nb = float(nbytes.reshape(L * E, O)[np.arange(L * E), chosen.reshape(-1)].sum())
    return Solution(
        chosen.reshape(-1), total, nb, "enumeration", time.perf_counter() - t0, {"experts_per_layer": K, "option": o}
    )
