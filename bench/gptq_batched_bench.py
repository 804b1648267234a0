"""Batched vs per-expert GPTQ on one synthetic MoE layer: time of `quant.layer.quantize_layer` (4 bits, the default
GPTQ options) for each mode, and whether the codes agree with the first mode's.

    OMP_NUM_THREADS=1 .venv/bin/python bench/gptq_batched_bench.py --experts 128 --hidden 512 --width 256
    .venv/bin/python bench/gptq_batched_bench.py --device cuda --experts 128 --hidden 2048 --width 768

Modes: ``per`` (expert by expert), ``auto`` (the default: batched with `quant.layer.gptq_batch`'s batch on CUDA,
and on the CPU where that batch holds several experts), an integer (that many experts per chunk and batch),
``cuda`` / ``cuda-nocap`` (on the CPU: the chunks and batches the CUDA path takes on a GPU of ``--gpu-bytes``, with
and without its cap of a batch's work at ``GPTQ_CUDA_LAYER_FRACTION`` of the layer: a CPU proxy of the device's
working memory where no GPU is at hand). CPU: CPU seconds of this process (one thread); CUDA: wall seconds after a
synchronize. Memory: on CUDA ``max_memory_allocated``; on the CPU the largest resident memory (sampled every 2 ms)
above the resident memory before the call (freed tensors of this size go back to the system, so this follows the
live tensors as the CUDA figure does). Writes reports/gptq_batched.<label>.json and .md.

    OMP_NUM_THREADS=1 .venv/bin/python bench/gptq_batched_bench.py --experts 128 --hidden 2048 --width 768 \
        --tokens 2048 --modes per,cuda,cuda-nocap --label cuda-proxy.E128.H2048.I768
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from moecompress.core.experts import routed_forward
from moecompress.quant import layer as qlayer
from moecompress.quant.layer import LayerCapture, gptq_batch, quantize_layer

ROOT = Path(__file__).resolve().parents[1]
PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


@contextmanager
def rss_above_start() -> Iterator[dict]:
    """``{"peak": bytes}``: the largest resident memory sampled every 2 ms while the block runs, above its start."""
    out, stop = {"peak": 0}, threading.Event()
    start = _rss()

    def sample() -> None:
        while not stop.is_set():
            out["peak"] = max(out["peak"], _rss() - start)
            time.sleep(0.002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        yield out
    finally:
        stop.set()
        t.join()
        out["peak"] = max(out["peak"], _rss() - start)


@contextmanager
def cuda_sizing(mode: str, gpu_bytes: int) -> Iterator[tuple[int, int] | None]:
    """For ``cuda`` / ``cuda-nocap``: quantize_layer's batched GPTQ takes the (chunk, batch) that ``gptq_batch`` gives
    on a CUDA device of ``gpu_bytes`` (``cuda-nocap``: without the layer-fraction cap), wherever it runs."""
    if mode not in ("cuda", "cuda-nocap"):
        yield None
        return
    real, frac = qlayer.gptq_batch, qlayer.GPTQ_CUDA_LAYER_FRACTION
    sizes: list[tuple[int, int]] = []

    def on_cuda(E, H, I, with_down, device, limit=None, layer_bytes=None):
        sizes.append(real(E, H, I, with_down, torch.device("cuda"), gpu_bytes, layer_bytes))
        return sizes[-1]

    qlayer.gptq_batch = on_cuda
    if mode == "cuda-nocap":
        qlayer.GPTQ_CUDA_LAYER_FRACTION = 1e30  # (no cap)
    try:
        yield sizes
    finally:
        qlayer.gptq_batch, qlayer.GPTQ_CUDA_LAYER_FRACTION = real, frac


def main() -> None:
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:  # a fixed threshold: every tensor past 128 KiB is mapped and
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"  # unmapped when freed (glibc otherwise raises it up to 32 MiB
        os.execv(sys.executable, [sys.executable, *sys.argv])  # and reuses heap), so RSS follows the live tensors
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--modes", default="per,auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--gpu-bytes", type=float, default=141e9, help="the GPU the cuda modes size for (an H200)")
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
        chunk = None if m in ("per", "auto", "cuda", "cuda-nocap") else int(m)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        t0, c0 = time.perf_counter(), time.process_time()
        with cuda_sizing(m, int(a.gpu_bytes)) as sizes, rss_above_start() as rss:
            out, used, err = quantize_layer(gu, dn, torch.nn.functional.silu, (4,), "gptq", cap, 32, torch.bfloat16,
                                            chunk=chunk, batched={"per": False, "auto": None}.get(m, True))  # fmt: skip
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
        secs = time.perf_counter() - t0 if dev.type == "cuda" else time.process_time() - c0
        q = out[4]
        # int8 codes of every weight (the first mode's kept to compare, this one's only while it is compared)
        mine = torch.cat([q.gate_up_q.flatten(), q.down_q.flatten()])
        del out, q
        first = codes.setdefault("first", mine)
        same = (mine == first).float().mean().item()
        del mine
        rows.append({
            "mode": m, "seconds": round(secs, 2), "clock": "wall" if dev.type == "cuda" else "cpu",
            "gptq_experts": used.count("gptq"), "err_sum": float(err.sum()), "codes_equal_to_first": same,
            "peak_cuda_bytes": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None,
            "peak_rss_above_start": rss["peak"], "chunk_batch": sizes[0] if sizes else None,
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    chunk, batch = gptq_batch(E, H, I, False, dev, layer_bytes=held)
    res = {"experts": E, "hidden": H, "width": I, "tokens": a.tokens, "top_k": a.top_k, "device": str(dev),
           "auto_chunk": chunk, "auto_batch": batch, "layer_bytes": held, "gpu_bytes": a.gpu_bytes,
           "torch": torch.__version__, "rows": rows}  # fmt: skip
    label = a.label or f"{dev.type}.E{E}.H{H}.I{I}"
    out = Path(a.out)
    (out / f"gptq_batched.{label}.json").write_text(json.dumps(res, indent=1) + "\n")
    md = [f"GPTQ 4 bits, one synthetic layer E {E} H {H} I {I} ({held / 2**30:.2f} GiB of bf16 routed weights), "
          f"{a.tokens} tokens top-{a.top_k}, {dev}; auto = chunk {chunk}, batch {batch} "
          "(`bench/gptq_batched_bench.py`)", "",
          "| mode | chunk, batch | seconds | GPTQ experts | codes equal to the first mode | peak CUDA | peak RSS above "
          "the start | of the layer |",
          "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        peak = f"{r['peak_cuda_bytes'] / 2**30:.2f} GiB" if r["peak_cuda_bytes"] else "-"
        cb = ", ".join(map(str, r["chunk_batch"])) if r["chunk_batch"] else "-"
        md.append(f"| {r['mode']} | {cb} | {r['seconds']} ({r['clock']}) | {r['gptq_experts']} | "
                  f"{100 * r['codes_equal_to_first']:.3f}% | {peak} | {r['peak_rss_above_start'] / 2**30:.2f} GiB | "
                  f"{r['peak_rss_above_start'] / held:.2f}x |")  # fmt: skip
    (out / f"gptq_batched.{label}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
