"""Batched vs per-expert GPTQ on one synthetic MoE layer: time of `quant.layer.quantize_layer` (4 bits, the default
GPTQ options) for each mode, and whether the codes agree with the first mode's.

    OMP_NUM_THREADS=1 .venv/bin/python bench/gptq_batched_bench.py --experts 128 --hidden 512 --width 256
    .venv/bin/python bench/gptq_batched_bench.py --device cuda --experts 128 --hidden 2048 --width 768

Modes: ``per`` (expert by expert), ``auto`` (the default: batched with `quant.layer.gptq_batch`'s batch on CUDA,
and on the CPU where that batch holds several experts), an integer (that many experts per chunk and batch).
CPU: CPU seconds of this process (one thread); CUDA: wall seconds after a synchronize. Writes
reports/gptq_batched.<label>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from moecompress.core.experts import routed_forward
from moecompress.quant.layer import LayerCapture, gptq_batch, quantize_layer

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--modes", default="per,auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--label", default=None)
    ap.add_argument("--out", default=str(ROOT / "reports"))
    a = ap.parse_args()
    E, H, I, dev = a.experts, a.hidden, a.width, torch.device(a.device)
    gen = torch.Generator().manual_seed(0)
    gu = (torch.randn(E, 2 * I, H, generator=gen) / H**0.5).bfloat16().to(dev)
    dn = (torch.randn(E, H, I, generator=gen) / I**0.5).bfloat16().to(dev)
    cap = LayerCapture(E, H, I, device=dev)
    for _ in range(max(1, a.tokens // 256)):
        x = torch.randn(256, H, generator=gen)
        p, idx = torch.softmax(torch.randn(256, E, generator=gen), -1).topk(a.top_k)
        p = p / p.sum(-1, keepdim=True)
        cap.add_batch(x, idx, p)
        routed_forward(gu.float(), dn.float(), torch.nn.functional.silu, x.to(dev), idx.to(dev), p.to(dev),
                       cap.observer())  # fmt: skip
    held = (gu.numel() + dn.numel()) * 2
    rows, codes = [], {}
    for m in a.modes.split(","):
        chunk = None if m in ("per", "auto") else int(m)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        t0, c0 = time.perf_counter(), time.process_time()
        out, used, err = quantize_layer(gu, dn, torch.nn.functional.silu, (4,), "gptq", cap, 32, torch.bfloat16,
                                        chunk=chunk, batched={"per": False, "auto": None}.get(m, True))  # fmt: skip
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        secs = time.perf_counter() - t0 if dev.type == "cuda" else time.process_time() - c0
        q = out[4]
        codes[m] = torch.cat([q.gate_up_q.flatten(), q.down_q.flatten()])
        same = (codes[m] == codes[a.modes.split(",")[0]]).float().mean().item()
        rows.append({
            "mode": m, "seconds": round(secs, 2), "clock": "wall" if dev.type == "cuda" else "cpu",
            "gptq_experts": used.count("gptq"), "err_sum": float(err.sum()), "codes_equal_to_first": same,
            "peak_cuda_bytes": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None,
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    chunk, batch = gptq_batch(E, H, I, False, dev, layer_bytes=held)
    res = {"experts": E, "hidden": H, "width": I, "tokens": a.tokens, "top_k": a.top_k, "device": str(dev),
           "auto_chunk": chunk, "auto_batch": batch, "torch": torch.__version__, "rows": rows}  # fmt: skip
    label = a.label or f"{dev.type}.E{E}.H{H}.I{I}"
    out = Path(a.out)
    (out / f"gptq_batched.{label}.json").write_text(json.dumps(res, indent=1) + "\n")
    md = [f"GPTQ 4 bits, one synthetic layer E {E} H {H} I {I}, {a.tokens} tokens top-{a.top_k}, {dev}; "
          f"auto = chunk {chunk}, batch {batch} (`bench/gptq_batched_bench.py`)", "",
          "| mode | seconds | GPTQ experts | codes equal to the first mode | peak CUDA |",
          "|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        peak = f"{r['peak_cuda_bytes'] / 2**30:.2f} GiB" if r["peak_cuda_bytes"] else "-"
        md.append(f"| {r['mode']} | {r['seconds']} ({r['clock']}) | {r['gptq_experts']} | "
                  f"{100 * r['codes_equal_to_first']:.3f}% | {peak} |")  # fmt: skip
    (out / f"gptq_batched.{label}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
