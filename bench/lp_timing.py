"""Time the global bit-allocation ILP on a synthetic problem the size of Qwen3-30B-A3B.

48 MoE layers x 128 routed experts x 4 widths (2/3/4/8 bits), expert projections of Qwen3-30B
(gate/up [768, 2048], down [2048, 768]), bf16 group-128 scales. Costs: a random per-expert importance (log-normal)
times a per-width error that falls ~4x per extra bit with per-expert noise. Budget: 3.0 average bits.
Also times the per-projection variant (x 3 projections = 73,728 binaries) and the layer-tied variant.

    OMP_NUM_THREADS=1 .venv/bin/python bench/lp_timing.py        # writes reports/lp_timing.json
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from moecompress.quant.bitplan import allocate_bits_detailed
from moecompress.quant.rtn import quantized_nbytes

ROOT = Path(__file__).resolve().parents[1]
BITS = (2, 3, 4, 8)
LAYERS, EXPERTS, H, I = 48, 128, 2048, 768
PROJ = ((I, H), (I, H), (H, I))  # gate, up, down as [rows, cols]


def synthetic(seed: int, per_projection: bool) -> tuple[np.ndarray, np.ndarray, float]:
    rng = np.random.default_rng(seed)
    items = LAYERS * EXPERTS * (3 if per_projection else 1)
    projs = PROJ if not per_projection else None
    if per_projection:
        nb = np.array([[quantized_nbytes(r, c, b, 128) for b in BITS] for (r, c) in PROJ], dtype=np.float64)
        nbytes = np.tile(nb, (LAYERS * EXPERTS, 1))
        params = LAYERS * EXPERTS * sum(r * c for r, c in PROJ)
    else:
        nb = np.array([sum(quantized_nbytes(r, c, b, 128) for r, c in projs) for b in BITS], dtype=np.float64)
        nbytes = np.tile(nb, (items, 1))
        params = items * sum(r * c for r, c in PROJ)
    importance = rng.lognormal(0.0, 1.0, size=(items, 1))
    err = 4.0 ** -np.array(BITS, dtype=np.float64)[None, :] * rng.lognormal(0.0, 0.3, size=(items, len(BITS)))
    costs = importance * err
    # budget = bytes of a uniform 3-bit model (payload 3 bits/weight + the same scale overhead)
    budget = float(nbytes[:, BITS.index(3)].sum())
    assert abs(budget - (params * 3 / 8 + nbytes[:, 0].sum() - params * 2 / 8)) < 1e-3 * budget
    return costs, nbytes, budget


def run(case: str, per_projection: bool, layer_tied: bool, solver: str | None, seed: int = 0) -> dict:
    costs, nbytes, budget = synthetic(seed, per_projection)
    groups = None
    if layer_tied:
        groups = np.repeat(np.arange(LAYERS), costs.shape[0] // LAYERS)
    t0 = time.perf_counter()
    res = allocate_bits_detailed(costs, nbytes, budget, groups, solver=solver)
    total_s = time.perf_counter() - t0
    counts = {str(b): int((res.choice == i).sum()) for i, b in enumerate(BITS)}
    uniform3 = float(costs[:, BITS.index(3)].sum())
    return {
        "case": case,
        "solver": res.solver,
        "items": int(costs.shape[0]),
        "binaries_full": int(costs.size),
        "binaries_after_dominance": res.n_binaries,
        "budget_bytes": budget,
        "plan_bytes": res.nbytes,
        "cost": res.cost,
        "uniform_3bit_cost": uniform3,
        "width_counts": counts,
        "build_s": round(res.info["build_s"], 3),
        "solve_s": round(res.solve_s, 3),
        "total_s": round(total_s, 3),
        "goal_s": 5.0,
        "meets_goal": total_s <= 5.0,
    }


def main() -> None:
    rows = []
    for solver in ("HiGHS", "PULP_CBC_CMD"):
        rows.append(run("experts 48x128x4", False, False, solver))
        rows.append(run("projections 48x128x3x4", True, False, solver))
        rows.append(run("layer-tied 48x128x4", False, True, solver))
    for r in rows:
        print(
            f"{r['case']:26s} {r['solver']:13s} binaries {r['binaries_full']:6d} ({r['binaries_after_dominance']:6d})"
            f" build {r['build_s']:6.2f}s solve {r['solve_s']:6.2f}s total {r['total_s']:6.2f}s"
            f" cost {r['cost']:.4g} (uniform-3 {r['uniform_3bit_cost']:.4g}) widths {r['width_counts']}"
        )
    out = {
        "command": "OMP_NUM_THREADS=1 .venv/bin/python bench/lp_timing.py",
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_average_1_5_15_min_after": [round(x, 2) for x in os.getloadavg()],  # other processes compete
        },
        "results": rows,
    }
    (ROOT / "reports").mkdir(exist_ok=True)
    (ROOT / "reports" / "lp_timing.json").write_text(json.dumps(out, indent=1))
    print("wrote reports/lp_timing.json")


if __name__ == "__main__":
    main()
