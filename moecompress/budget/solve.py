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
through highspy's own API when it is installed, to a proved relative gap of ``MIP_REL_GAP`` (0.1%; pulp's modelling
layer alone took 4 s to build a Qwen3-30B-sized instance), else through pulp (HiGHS or its bundled CBC).
``servable_plan`` solves the servable variant exactly: one expert count and one channel width for the whole model
(what a config states), one bit width per layer (one quantization scheme per layer); bytes no longer depend on which
experts are kept, so each (count, option) has its best experts per layer by sorting, and each (count, width) its
best bits per layer by a small knapsack over the layers.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from ..quant.bitplan import available_solver, new_var, quiet_stdout

# HiGHS stops once the plan's cost is proved within 0.1% of the optimum (its default is 0.01%): a Qwen3-30B-sized
# instance with the per-projection menu (6,144 experts x 49 options, 95,497 binaries after Pareto pruning) took
# 10.9 s CPU at 0.01% and 6.3 s at 0.1% for a plan 0.02% costlier (bench/budget_bench.py synthetic_ip, one core)
MIP_REL_GAP = 1e-3


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
    c = np.where(ok, costs, np.inf)
    b = np.where(ok, nbytes, np.inf)
    c[:, 0] = b[:, 0] = np.inf  # option 0 (removal) is always its own variable
    order = np.lexsort((c, b))  # [N, O] by bytes, then cost, per row
    cs = np.take_along_axis(c, order, axis=1)
    best_before = np.concatenate([np.full((c.shape[0], 1), np.inf), np.minimum.accumulate(cs, axis=1)[:, :-1]], 1)
    keep = cs < best_before
    return [order[n][keep[n]] for n in range(c.shape[0])]


def _highs_solve(costs, nbytes, ok, shape: Shape, budget: float, time_limit_s: float):
    """The program through highspy's own API (no modelling layer: a 48 x 128 x 13 instance builds in ~1 s).
    Returns ``(choice, status, solve_s, info)`` or None when highspy is not installed."""
    try:
        import highspy
        import scipy.sparse as sp
    except ImportError:
        return None
    t0 = time.perf_counter()
    kept = _kept_options(costs, nbytes, ok)
    N = costs.shape[0]
    item = np.concatenate([np.full(len(k) + bool(ok[n, 0]), n) for n, k in enumerate(kept)])
    opt = np.concatenate([np.concatenate([[0] if ok[n, 0] else [], k]).astype(np.int64) for n, k in enumerate(kept)])
    V = len(item)
    c, b = costs[item, opt], nbytes[item, opt]
    kept_col = opt != 0
    cols = np.arange(V)
    blocks = [
        sp.csr_matrix((np.ones(V), (item, cols)), shape=(N, V)),
        sp.csr_matrix((b, (np.zeros(V, dtype=np.int64), cols)), shape=(1, V)),
    ]
    layers = np.unique(shape.layer)
    lidx = np.searchsorted(layers, shape.layer[item])
    blocks.append(sp.csr_matrix((np.ones(kept_col.sum()), (lidx[kept_col], cols[kept_col])), shape=(len(layers), V)))
    lo = [np.ones(N), [-highspy.kHighsInf], np.full(len(layers), float(shape.min_keep))]
    hi = [np.ones(N), [float(budget)], np.full(len(layers), highspy.kHighsInf)]
    if shape.n_group > 1:
        groups = sorted({(int(shape.layer[n]), int(shape.group[n])) for n in range(N)})
        gidx = {g: i for i, g in enumerate(groups)}
        grow = np.array([gidx[(int(shape.layer[n]), int(shape.group[n]))] for n in item])
        blocks.append(
            sp.csr_matrix((np.ones(kept_col.sum()), (grow[kept_col], cols[kept_col])), shape=(len(groups), V))
        )
        lo.append(np.full(len(groups), float(shape.per_group)))
        hi.append(np.full(len(groups), highspy.kHighsInf))
        first = {}
        eq_r, eq_c, eq_v = [], [], []
        for (l, _g), i in gidx.items():
            first.setdefault(l, i)
        rows = [(i, first[l]) for (l, _g), i in gidx.items() if first[l] != i]
        for k, (i, j) in enumerate(rows):
            for src, sign in ((i, 1.0), (j, -1.0)):
                m = kept_col & (grow == src)
                eq_r += [k] * int(m.sum())
                eq_c += cols[m].tolist()
                eq_v += [sign] * int(m.sum())
        if rows:
            blocks.append(sp.csr_matrix((eq_v, (eq_r, eq_c)), shape=(len(rows), V)))
            lo.append(np.zeros(len(rows)))
            hi.append(np.zeros(len(rows)))
    A = sp.vstack(blocks).tocsc()
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("time_limit", float(time_limit_s))
    h.setOptionValue("mip_rel_gap", MIP_REL_GAP)
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = V, A.shape[0]
    lp.col_cost_, lp.col_lower_, lp.col_upper_ = c, np.zeros(V), np.ones(V)
    lp.row_lower_, lp.row_upper_ = np.concatenate(lo), np.concatenate(hi)
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_, lp.a_matrix_.index_, lp.a_matrix_.value_ = A.indptr, A.indices, A.data
    lp.integrality_ = [highspy.HighsVarType.kInteger] * V
    h.passModel(lp)
    build_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    with quiet_stdout():
        h.run()
    solve_s = time.perf_counter() - t1
    status = h.modelStatusToString(h.getModelStatus())
    if status != "Optimal":
        return None, status, solve_s, {}
    gap = float(h.getInfo().mip_gap)
    x = np.asarray(h.getSolution().col_value)
    choice = np.zeros(N, dtype=np.int64)
    on = x > 0.5
    choice[item[on]] = opt[on]
    info = {"build_s": round(build_s, 3), "binaries": V, "full_binaries": int(costs.size), "mip_gap": gap}
    return choice, status, solve_s, info


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
            row.append((0, new_var(prob, f"r_{n}")))
        row += [(int(j), new_var(prob, f"x_{n}_{j}")) for j in ks]
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
        name, slv = available_solver(solver)
    slv.timeLimit = time_limit_s
    t = time.perf_counter()
    with quiet_stdout():
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
    got = _highs_solve(costs, nbytes, ok, shape, budget, time_limit_s) if solver in (None, "HiGHS") else None
    if got is not None:
        choice, status, solve_s, info = got
        name = "HiGHS (highspy)"
    else:
        t0 = time.perf_counter()
        prob, xs = _problem(costs, nbytes, ok, shape, budget, "cost")
        build_s = time.perf_counter() - t0
        name, status, solve_s = _run(prob, solver, time_limit_s)
        info = {"build_s": round(build_s, 3), "binaries": sum(len(r) for r in xs), "full_binaries": int(costs.size)}
        choice = _read(xs) if status == "Optimal" else None
    if status == "Infeasible":
        raise ValueError(f"budget of {budget:,.0f} bytes cannot hold the routed experts")
    if status != "Optimal" or choice is None:
        raise ValueError(f"the planner's solver ({name}) ended with status {status}: raise the budget or time limit")
    total = float(nbytes[np.arange(len(choice)), choice].sum())
    if total > budget * (1 + 1e-9) + 1e-6:
        raise ValueError(f"solver returned a plan over budget ({total:,.0f} > {budget:,.0f} bytes)")
    return Solution(choice, float(costs[np.arange(len(choice)), choice].sum()), total, name, solve_s, info)


def _keep_costs(costs: np.ndarray, ok: np.ndarray, shape: Shape, opts: list[int]) -> np.ndarray:
    """``C [O', L, E + 1]``: layer l's summed cost with its best K experts kept at option ``opts[j]`` and the rest
    removed (K per layer, K / n_group per group; the experts with the smallest cost of keeping them rather than
    removing them, never-removed ones first); inf where K cannot be met (a never-removed expert left out, or an
    expert kept at an option it may not take) or the groups cannot split K evenly."""
    L, E, _ = costs.shape
    must = ~ok[:, :, 0]
    g = max(shape.n_group, 1)
    grp = shape.group.reshape(L, E)
    out = np.full((len(opts), L, E + 1), np.inf)
    removed = costs[:, :, 0].sum(1)  # [L] every expert removed
    for j, o in enumerate(opts):
        for l in range(L):
            per = np.zeros(E // g + 1)  # summed over groups, k experts per group
            for q in range(g):
                m = np.where(grp[l] == q)[0] if g > 1 else np.arange(E)
                delta = np.where(ok[l, m, o], costs[l, m, o] - costs[l, m, 0], np.inf)
                order = np.lexsort((delta, ~must[l, m]))  # never-removed experts first, then by delta
                cum = np.concatenate([[0.0], np.cumsum(delta[order])])[: E // g + 1]
                cum[: int(must[l, m].sum())] = np.inf  # a never-removed expert left out
                per += cum
            ks = np.arange(E // g + 1)
            out[j, l, ks * g] = removed[l] + per
    if g > 1 or shape.per_group > 1:
        ks = np.arange(E + 1)
        out[:, :, (ks % g != 0) | (ks // g < (shape.per_group if g > 1 else 1))] = np.inf
    out[:, :, : shape.min_keep] = np.inf
    return out


def servable_plan(
    costs: np.ndarray,  # [L, E, O]
    nbytes: np.ndarray,  # [L, E, O] (bytes of a kept option do not depend on the expert)
    budget: float,
    shape: Shape,
    allowed: np.ndarray | None = None,
    kept_options: list[int] | None = None,
    width_of: dict[int, int] | None = None,
) -> Solution:
    """One expert count K and one channel width (``width_of``: option -> width; default one width for all) for the
    whole model, what a config states; per layer one kept option of that width (its bits: one quantization scheme
    per layer) for all its kept experts, the K with the smallest cost of keeping them rather than removing them (per
    group with group routers). Exact: per (K, width) the best option of every layer under the budget is a
    multiple-choice knapsack over the layers (``solve``; skipped when each layer's best fits, or when it cannot beat
    the best so far)."""
    t0 = time.perf_counter()
    L, E, O = costs.shape
    ok = np.ones(costs.shape, dtype=bool) if allowed is None else np.asarray(allowed, dtype=bool)
    opts = list(kept_options or range(1, O))
    width_of = width_of or dict.fromkeys(opts, 0)
    C = _keep_costs(costs, ok, shape, opts)  # [O', L, E + 1]
    per = np.array([float(nbytes[0, 0, o]) for o in opts])
    best: tuple[float, int, np.ndarray] | None = None  # (cost, K, option index per layer)
    solves = 0
    for K in range(shape.min_keep, E + 1):
        for w in sorted(set(width_of.values())):
            js = [j for j, o in enumerate(opts) if width_of[o] == w]
            c = C[js][:, :, K].T  # [L, n] cost of layer l at option js[n]
            b = np.broadcast_to(K * per[js], c.shape)
            fin = np.isfinite(c)
            if not fin.any(axis=1).all() or np.where(fin, b, np.inf).min(1).sum() > budget * (1 + 1e-9) + 1e-6:
                continue
            pick = np.where(fin, c, np.inf).argmin(1)
            lb = float(c[np.arange(L), pick].sum())
            if best is not None and lb >= best[0]:
                continue
            if b[np.arange(L), pick].sum() > budget * (1 + 1e-9) + 1e-6:  # a knapsack over the layers
                solves += 1
                items = Shape(np.arange(L), np.zeros(L, dtype=np.int64), 0)
                z = np.zeros((L, 1))
                try:
                    sol = solve(np.hstack([z, np.where(fin, c, 0.0)]), np.hstack([z, b]), budget, items,
                                np.hstack([np.zeros((L, 1), dtype=bool), fin]))  # fmt: skip
                except ValueError:
                    continue
                pick = sol.choice - 1
            total = float(c[np.arange(L), pick].sum())
            if best is None or total < best[0]:
                best = (total, K, np.array([js[p] for p in pick]))
    if best is None:
        raise ValueError(f"budget of {budget:,.0f} bytes cannot hold the routed experts with one layout per model")
    total, K, jl = best
    g = max(shape.n_group, 1)
    grp = shape.group.reshape(L, E)
    chosen = np.zeros((L, E), dtype=np.int64)
    for l in range(L):
        o = opts[jl[l]]
        for q in range(g):
            m = np.where(grp[l] == q)[0] if g > 1 else np.arange(E)
            delta = np.where(ok[l, m, o], costs[l, m, o] - costs[l, m, 0], np.inf)
            chosen[l, m[np.lexsort((delta, ok[l, m, 0]))[: K // g]]] = o
    nb = float(nbytes.reshape(L * E, O)[np.arange(L * E), chosen.reshape(-1)].sum())
    cost = float(costs.reshape(L * E, O)[np.arange(L * E), chosen.reshape(-1)].sum())
    info = {"experts_per_layer": K, "options": [int(opts[j]) for j in jl], "knapsacks_solved": solves}
    return Solution(chosen.reshape(-1), cost, nb, "enumeration + knapsack over layers", time.perf_counter() - t0, info)
