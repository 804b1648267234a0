"""Peak resident memory of the prune's down refit (``prune.refit.fit_downs``) above what it is given, at DeepSeek-V3
dims (issue 13): T tokens, hidden 7168, 16 experts of width 2048, 8 kept and every token routed to each (top-8),
random bf16 downs and float32 activations; prints the peak (VmHWM after /proc/self/clear_refs, minus VmRSS before),
the CPU seconds and sha256 prefixes of the fitted downs and output (to compare two checkouts: PYTHONPATH=...).

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/fit_downs_probe.py 4096
"""

from __future__ import annotations

import hashlib
import sys
import time

import torch

from moecompress.prune.refit import fit_downs
from moecompress.prune.transform import PruneOptions


def status() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(line.split()[1]) / 2**20  # GiB
    return out


def main() -> None:
    T, H, I, E = (int(sys.argv[1]) if len(sys.argv) > 1 else 4096), 7168, 2048, 16
    g = torch.Generator().manual_seed(0)
    down = (torch.randn(E, H, I, generator=g) * 0.02).bfloat16()
    kept = list(range(0, E, 2))
    w = torch.zeros(T, E)
    w[:, kept] = torch.rand(T, len(kept), generator=g) + 0.1
    y0, yn = torch.randn(T, H, generator=g), torch.randn(T, H, generator=g)
    h = torch.randn(T, I, generator=g)

    def hidden(e: int, rows: torch.Tensor) -> torch.Tensor:
        return h[rows] * (1 + e / 100)

    opts = PruneOptions(0.5)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status()
    t = time.process_time()
    cur, y = fit_downs(hidden, down, kept, w, y0, yn, kept_only=True, holdout=opts.refit_holdout,
                       min_rows=opts.refit_min_rows)  # fmt: skip
    peak = status()["VmHWM"] - base["VmRSS"]
    sha = [hashlib.sha256(a.numpy().tobytes()).hexdigest()[:16] for a in (cur, y)]
    gib = cur.numel() * 4 / 2**30
    print(
        f"T {T}: fit_downs peak {peak:.3f} GiB above its inputs (the fitted downs {gib:.3f} GiB), "
        f"{time.process_time() - t:.1f} CPU s; sha256 downs {sha[0]} output {sha[1]}"
    )


if __name__ == "__main__":
    main()
