"""Fit the cost model's coefficients to measured runs: non-negative least squares on relative errors.

    coefs = fit(runs)   # runs: [{"variant", "shape": ModelShape, "settings": Settings, "host_bytes", "seconds"}]

Each row is divided by its measurement, so a 1 GiB run and a 16 GiB run weigh the same (the target is a relative
error). Coefficients are non-negative (a copy count or seconds per operation is never negative).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import nnls

from .model import HOST_FLOOR, features, priors


def fit_terms(
    rows: list[dict[str, float]],
    measured: list[float],
    prior: dict[str, float] | None = None,
    weight: float = 1e-3,
    floor: dict[str, float] | None = None,
) -> dict[str, float]:
    """Coefficients c_j >= floor_j (default 0) minimizing sum_i ((sum_j c_j rows[i][j] - m_i) / m_i)^2
    + weight sum_j (c_j / prior_j - 1)^2 (the second sum over every term but "const", left out with ``prior=None``).

    The prior only decides what the runs leave open (terms that do not vary across them); a floor is what is
    certain (the engine always holds one fp32 layer). Raises ValueError without data."""
    if not rows or len(rows) != len(measured) or min(measured) <= 0:
        raise ValueError("fit needs at least one run with a positive measurement per row")
    names = sorted({n for r in rows for n in r})
    low = np.array([(floor or {}).get(n, 0.0) for n in names])
    if prior is None:
        top = [max(abs(r.get(n, 0.0)) / m for r, m in zip(rows, measured, strict=True)) for n in names]
        scale = 1.0 / np.maximum(np.array(top), 1e-300)
    else:
        scale = np.array([prior.get(n, 1.0) for n in names], dtype=np.float64)
    # c_j = low_j + scale_j x_j with x_j >= 0; each row divided by its measurement (relative errors)
    F = np.array([[r.get(n, 0.0) for n in names] for r in rows], dtype=np.float64)
    m = np.array(measured, dtype=np.float64)
    A = F * scale / m[:, None]
    b = 1.0 - (F @ low) / m
    if prior is not None:  # every term but the constant (which every run determines) is pulled towards its prior
        pulled = [j for j, n in enumerate(names) if n != "const"]
        P = np.zeros((len(pulled), len(names)))
        P[range(len(pulled)), pulled] = np.sqrt(weight)
        target = np.maximum(0.0, 1.0 - low[pulled] / scale[pulled])
        A = np.vstack([A, P])
        b = np.concatenate([b, np.sqrt(weight) * target])
    x, _ = nnls(A, b, maxiter=50 * len(names))
    return {n: float(lo + v * sc) for n, lo, v, sc in zip(names, low, x, scale, strict=True)}


def fit(
    runs: list[dict[str, Any]], mac_per_s: float | None = None, clip_per_s: float | None = None
) -> dict[str, dict[str, Any]]:
    """Per variant: fitted "host" and "seconds" coefficients and the runs they came from (pulled weakly towards
    ``model.priors(mac_per_s, clip_per_s)`` when given)."""
    host_prior, time_prior = priors(mac_per_s, clip_per_s) if mac_per_s else (None, None)
    # certain: the layer-streamed forward cannot run faster than this CPU's measured multiply-add rate (without the
    # floor, runs whose forward is small beside the statistics left it at 0, and a 262k-token profile of a 30B model
    # came out at half an hour)
    time_floor = {"fwd": 1.0 / mac_per_s} if mac_per_s else None
    out: dict[str, dict[str, Any]] = {}
    for var in sorted({r["variant"] for r in runs}):
        mine = [r for r in runs if r["variant"] == var]
        mem = [features(r["shape"], var, r["settings"])[0] for r in mine]
        tim = [features(r["shape"], var, r["settings"])[2] for r in mine]
        out[var] = {
            "host": fit_terms(mem, [float(r["host_bytes"]) for r in mine], host_prior, floor=HOST_FLOOR),
            "seconds": fit_terms(tim, [float(r["seconds"]) for r in mine], time_prior, floor=time_floor),
            "runs": [r["name"] for r in mine],
        }
    return out
