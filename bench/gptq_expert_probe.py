"""Per-phase peak RSS of quantize's per-expert GPTQ path (quant/layer.py ``one_expert``) on ONE synthetic expert at
given dims (Linux): each wrapped call (the routed Hessian, the inverse Cholesky, prepare_hessian, refine_scales,
gptq_quantize, the expert forward) prints ``(name, rss before, VmHWM during, rss after, CPU s)`` in MiB above the
process's state once the expert's bf16 weights and its captured inputs exist (VmHWM reset through /proc/self/clear_refs
around each call). Where the DeepSeek-V3-dims slice's quantize-gptq peaked (refine_scales, reports/scale_bench.ops13n).

    OMP_NUM_THREADS=1 .venv/bin/python bench/gptq_expert_probe.py 7168 2048 2048   # H, I, routed tokens
"""

import sys
import time

import torch

from moecompress.quant import gptq as G
from moecompress.quant import layer as L

BASE = [0]


def _status() -> dict[str, int]:
    d = {}
    for line in open("/proc/self/status"):
        if line.startswith(("VmRSS", "VmHWM")):
            d[line.split(":")[0]] = int(line.split()[1])
    return d


def _reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _mib(kib: int) -> float:
    return round((kib - BASE[0]) / 1024, 1)


def _wrapped(name, fn):
    def w(*a, **k):
        before = _status()["VmRSS"]
        _reset()
        out = fn(*a, **k)
        s = _status()
        print((name, _mib(before), _mib(s["VmHWM"]), _mib(s["VmRSS"]), round(time.process_time(), 1)), flush=True)
        _reset()
        return out

    return w


def main() -> None:
    H, I, T = (int(a) for a in sys.argv[1:4])
    torch.manual_seed(0)
    gu = (torch.randn(1, 2 * I, H) * 0.02).bfloat16()
    dn = (torch.randn(1, H, I) * 0.02).bfloat16()
    cap = L.LayerCapture(1, H, I, torch.device("cpu"), with_down=False, weighted=True)
    x = torch.randn(T, H)
    cap.add_batch(x, torch.zeros(T, 1, dtype=torch.long), torch.rand(T, 1))
    cap.counts[0] = T
    del x
    for n in ("prepare_hessian", "gptq_quantize", "_expert_out"):
        setattr(L, n, _wrapped(n, getattr(L, n)))
    for n in ("refine_scales", "_inverse_cholesky_"):
        setattr(G, n, _wrapped(n, getattr(G, n)))
    cap.hessians = _wrapped("hessians", cap.hessians)
    BASE[0] = _status()["VmRSS"]
    print("base MiB", round(BASE[0] / 1024, 1), "(the expert's bf16 weights, its captured fp32 inputs)", flush=True)
    _reset()
    L.quantize_layer(gu, dn, torch.nn.functional.silu, (4,), "gptq", cap, 32, torch.bfloat16, torch.bfloat16,
                     L.GPTQOptions(), with_err=False, packed=True)  # fmt: skip
    print("end rss", _mib(_status()["VmRSS"]), "cpu", round(time.process_time(), 1), flush=True)


if __name__ == "__main__":
    main()
