"""Global bit allocation as a multiple-choice knapsack ILP (MC-MoE style), solved with pulp.

Items ``n`` (routed experts, or whole layers when widths are tied per layer) each pick exactly one width ``b``;
minimize ``sum c[n, b] x[n, b]`` subject to ``sum_b x[n, b] = 1`` and ``sum bytes[n, b] x[n, b] <= budget``.

Formulation choices that keep a Qwen3-30B-sized instance (48 x 128 experts x 4 widths) well under 5 s:
- the "one width per layer" constraint is applied by *aggregating* the items of a layer into one item (costs and
  bytes summed), which is exact and shrinks the problem instead of adding coupling constraints;
- choices dominated within an item (no fewer bytes and no lower cost than another choice) are dropped before
  solving (exact: an optimal solution never needs them);
- bytes are expressed relative to each item's smallest choice, so the budget row has small coefficients;
- HiGHS (through ``highspy``) when available, the bundled CBC otherwise.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from dataclasses import dataclass, field

import numpy as np


@dataclass
class BitPlanResult:
    """Solution of :func:`allocate_bits_detailed`."""

    choice: np.ndarray  # [N] index into the width axis
    cost: float
    nbytes: int
    solver: str
    status: str
    solve_s: float
    n_binaries: int
    info: dict = field(default_factory=dict)


def available_solver(prefer: str | None) -> tuple[str, object]:
    import pulp

    avail = pulp.listSolvers(onlyAvailable=True)
    order = [prefer] if prefer else []
    order += ["HiGHS", "PULP_CBC_CMD"]
    for name in order:
        if name in avail:
            return name, pulp.getSolver(name, msg=False)
    raise ValueError("no MIP solver available to pulp: install highspy (pip install highspy)")


@contextlib.contextmanager
def quiet_stdout():
    """Silence fd 1 (solver banners written from C) for the duration of the block."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no real stdout
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def new_var(prob, name: str):
    import pulp

    if hasattr(prob, "add_variable"):  # pulp >= 3.3
        return prob.add_variable(name, 0, 1, cat=pulp.LpBinary)
    return pulp.LpVariable(name, cat=pulp.LpBinary)


def _pareto(costs: np.ndarray, nbytes: np.ndarray) -> list[np.ndarray]:
    """Per item, the indices of non-dominated choices (strictly fewer bytes must mean strictly higher cost)."""
    keep = []
    for n in range(costs.shape[0]):
        order = np.lexsort((costs[n], nbytes[n]))  # by bytes, then cost
        best = np.inf
        kept = []
        for j in order:
            if costs[n, j] < best:
                kept.append(j)
                best = costs[n, j]
        keep.append(np.array(kept, dtype=np.int64))
    return keep


def allocate_bits_detailed(
    costs: np.ndarray,
    nbytes: np.ndarray,
    budget: float,
    groups_for_layer_constraint: np.ndarray | None = None,
    solver: str | None = None,
    time_limit_s: float = 120.0,
    allowed: np.ndarray | None = None,
) -> BitPlanResult:
    """Solve the allocation; see :func:`allocate_bits`. Returns the choice and solver details.

    ``allowed`` (optional ``[N, B]`` bool): choices an item may take (e.g. protected experts: 8 bits only). With a
    layer constraint, a group may take a width only if all its members may."""
    import pulp

    costs = np.asarray(costs, dtype=np.float64)  # [N, B]
    nbytes = np.asarray(nbytes, dtype=np.float64)  # [N, B]
    if costs.shape != nbytes.shape or costs.ndim != 2:
        raise ValueError("costs and nbytes must both be [N, B]")
    if not np.isfinite(costs).all():
        raise ValueError("costs must be finite")
    n_items = costs.shape[0]
    ok = np.ones(costs.shape, dtype=bool) if allowed is None else np.asarray(allowed, dtype=bool)
    if ok.shape != costs.shape or not ok.any(axis=1).all():
        raise ValueError("allowed must be [N, B] with at least one allowed choice per item")
    if groups_for_layer_constraint is not None:
        groups = np.asarray(groups_for_layer_constraint, dtype=np.int64)  # [N]
        uniq, inv = np.unique(groups, return_inverse=True)
        c_item = np.zeros((len(uniq), costs.shape[1]))
        b_item = np.zeros((len(uniq), costs.shape[1]))
        np.add.at(c_item, inv, costs)
        np.add.at(b_item, inv, nbytes)
        ok_item = np.ones(c_item.shape, dtype=bool)
        np.logical_and.at(ok_item, inv, ok)
        if not ok_item.any(axis=1).all():
            raise ValueError("a layer's experts allow no common width (protected experts): plan per expert")
    else:
        inv = np.arange(n_items)
        c_item, b_item, ok_item = costs, nbytes, ok
    big = np.where(ok_item, b_item, np.inf)
    min_total = big.min(axis=1).sum()
    if budget < min_total:
        raise ValueError(
            f"budget of {budget:,.0f} bytes is below the smallest possible model ({min_total:,.0f} bytes with every "
            "routed expert at the lowest width): raise the budget"
        )
    t0 = time.perf_counter()
    keep = _pareto(np.where(ok_item, c_item, np.inf), big)
    keep = [k[ok_item[m, k]] for m, k in enumerate(keep)]
    base_b = big.min(axis=1)  # [M]
    base_c = np.where(ok_item, c_item, np.inf).min(axis=1)
    prob = pulp.LpProblem("bitplan", pulp.LpMinimize)
    xs: list[list[pulp.LpVariable]] = []
    obj_terms = {}
    budget_terms = {}
    for m, ks in enumerate(keep):
        row = []
        for j in ks:
            v = new_var(prob, f"x_{m}_{j}")
            row.append(v)
            obj_terms[v] = float(c_item[m, j] - base_c[m])
            budget_terms[v] = float(b_item[m, j] - base_b[m])
        xs.append(row)
        if len(row) > 1:
            prob += pulp.LpAffineExpression([(v, 1.0) for v in row]) == 1, f"one_{m}"
    prob += pulp.LpAffineExpression(obj_terms)
    slack = float(budget - base_b.sum())
    prob += pulp.LpAffineExpression(budget_terms) <= slack, "budget"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # pulp 3.x announces its 4.0 API on PULP_CBC_CMD
        name, slv = available_solver(solver)
    slv.timeLimit = time_limit_s
    build_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    with quiet_stdout():  # highspy prints a banner even with msg=False
        prob.solve(slv)
    solve_s = time.perf_counter() - t1
    status = pulp.LpStatus[prob.status]
    if status != "Optimal":
        # the budget holds the smallest plan (checked above), so the problem is feasible: anything else is the solver
        # stopping early, at its time limit (CBC may then even say "Infeasible")
        hint = "" if name == "HiGHS" else "; install HiGHS (pip install highspy), which solves such plans in seconds"
        found = getattr(prob, "sol_status", None) == pulp.LpSolutionIntegerFeasible and all(
            len(row) == 1 or row[0].value() is not None for row in xs
        )
        if found:  # a feasible plan, not proven optimal
            status = f"feasible, not proven optimal (stopped at the {time_limit_s:g} s time limit)"
        elif solve_s >= 0.9 * time_limit_s:
            raise ValueError(
                f"bit allocation: the {name} solver reached its {time_limit_s:g} s time limit without a plan{hint}"
            )
        else:
            raise ValueError(f"bit allocation: the {name} solver stopped with status {status!r} without a plan{hint}")
    item_choice = np.empty(len(keep), dtype=np.int64)
    for m, (ks, row) in enumerate(zip(keep, xs, strict=True)):
        vals = [(v.value() or 0.0) if len(row) > 1 else 1.0 for v in row]
        item_choice[m] = ks[int(np.argmax(vals))]
    choice = item_choice[inv]  # [N]
    total_bytes = nbytes[np.arange(n_items), choice].sum()
    if total_bytes > budget + 1e-6 * max(budget, 1.0):
        raise ValueError(f"solver returned a plan over budget ({total_bytes:,.0f} > {budget:,.0f} bytes)")
    return BitPlanResult(
        choice=choice,
        cost=float(costs[np.arange(n_items), choice].sum()),
        nbytes=int(round(total_bytes)),
        solver=name,
        status=status,
        solve_s=solve_s,
        n_binaries=sum(len(k) for k in keep),
        info={"build_s": build_s, "items": len(keep), "full_binaries": int(c_item.size)},
    )


def allocate_bits(
    costs: np.ndarray,
    nbytes: np.ndarray,
    budget: float,
    groups_for_layer_constraint: np.ndarray | None = None,
) -> np.ndarray:
    """Pick one width per item minimizing total cost under a byte budget, globally over all items.

    Args:
        costs: ``[N, B]`` cost of giving item ``n`` width index ``b`` (e.g. importance x measured error).
        nbytes: ``[N, B]`` bytes of item ``n`` at width ``b`` (scales included).
        budget: total bytes allowed for all items.
        groups_for_layer_constraint: optional ``[N]`` group id (e.g. layer index); items of a group then share
            one width (the vLLM-servable layout).

    Returns:
        ``[N]`` int array of chosen width indices.

    Raises:
        ValueError: budget below the smallest possible total, or the problem is infeasible.
    """
    return allocate_bits_detailed(costs, nbytes, budget, groups_for_layer_constraint).choice
