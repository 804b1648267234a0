"""The output-error search alone on one synthetic MoE layer, with several cache sizes (issue 13).

Runs ``prune.order.output_error_order`` on T random tokens of layer 0 of a Qwen3-MoE-shaped checkpoint with
``ExpertOutputs`` holding C1, C2, ... slots per token, and prints per size the CPU seconds, the max RSS so far, the
removal order and the top functions by own time; last, whether every size chose the same experts with the same
costs (it must: slots not held are computed when asked for). Default layer: DeepSeek-V3's dims (hidden 7168, 16
experts of width 2048, top-8), made with ``bench/profile_bench.synthetic_checkpoint`` into a temporary folder unless
``--model`` names one already made.

    OMP_NUM_THREADS=1 .venv/bin/python bench/search_cache_harness.py --tokens 512 --slots 4,12
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_bench import synthetic_checkpoint  # noqa: E402

from moecompress.prune.order import ExpertOutputs, RouterSpec, output_error_order, route, routed_output, router_choice


def layer0(folder: Path, experts: int) -> tuple[torch.Tensor, ...]:
    """gate, up, down [E, ...] and the router weight of layer 0 of a checkpoint made by synthetic_checkpoint."""
    index = folder / "model.safetensors.index.json"
    where = json.loads(index.read_text())["weight_map"] if index.exists() else None

    def get(k: str) -> torch.Tensor:
        with safe_open(str(folder / (where[k] if where else "model.safetensors")), "pt") as f:
            return f.get_tensor(k)

    p = "model.layers.0.mlp."
    gate, up, down = (torch.stack([get(f"{p}experts.{e}.{n}_proj.weight") for e in range(experts)])
                      for n in ("gate", "up", "down"))  # fmt: skip
    return gate, up, down, get(f"{p}gate.weight").float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--slots", default="4,12", help="cache slots per token to compare (comma list)")
    ap.add_argument("--model", default=None, help="a checkpoint made by profile_bench.synthetic_checkpoint")
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--remove", type=int, default=8)
    args = ap.parse_args()
    tmp = None
    folder = Path(args.model) if args.model else None
    if folder is None:
        tmp = Path(tempfile.mkdtemp(prefix="search-harness-"))
        folder = tmp / "model"
        synthetic_checkpoint(folder, 1, args.hidden, args.experts, args.width, args.top_k)
    try:
        gate, up, down, router = layer0(folder, args.experts)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    T = args.tokens
    x = torch.randn(T, gate.shape[2], generator=torch.Generator().manual_seed(0))
    logits = x @ router.T
    spec = RouterSpec(top_k=args.top_k)
    res = {}
    for c in [int(s) for s in args.slots.split(",")]:
        t = time.process_time()
        prof = cProfile.Profile()
        prof.enable()
        src = ExpertOutputs(x, gate, up, down, router_choice(logits, spec, None), c, hidden=True)
        y0 = routed_output(src, torch.arange(T), *route(logits, spec, None, None))
        order = output_error_order(src, logits, spec, set(), args.remove, None, float(y0.double().pow(2).sum()), y0)
        prof.disable()
        res[c] = [(s.experts, s.cost) for s in order]
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"slots {c}: {time.process_time() - t:.1f} CPU s, max RSS {rss:.2f} GiB, order {res[c]}", flush=True)
        pstats.Stats(prof).sort_stats("tottime").print_stats(8)
        del src
    same_experts = len({tuple(s[0] for s in r) for r in res.values()}) == 1
    print("same experts:", same_experts, "same costs:", len({tuple(s[1] for s in r) for r in res.values()}) == 1)


if __name__ == "__main__":
    main()
