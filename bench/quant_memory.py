"""Memory and speed of the two quantized loaders on the built-in model: routed experts dequantized to dense at load
time (``load_quantized(packed=False)``) vs kept packed and dequantized on the fly (``packed=True``, PackedExperts).

The built-in model is quantized uniformly at 4 and 3 bits (RTN routed experts, ``--other-bits 8`` as the CLI
default). For the bf16 input and each (width, loader): bytes on disk (safetensors files), bytes of parameters +
buffers resident in the loaded model (all and routed experts only), peak RSS (VmHWM of a fresh process: after
imports, after load, after load + forwards), forward time (median of 3 forwards over the same tokens after one
warm-up), and whether the logits equal the dense loader's. On CUDA (when present) the same runs on the GPU with
torch.cuda.max_memory_allocated as the peak.

    OMP_NUM_THREADS=1 .venv/bin/python bench/quant_memory.py     # writes reports/quant_memory.json + .md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("MOECOMPRESS_QUIET", "1")
ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, sys, time, torch
def hwm():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1]) * 1024
torch.set_num_threads(1)
from moecompress.core.loading import load
from moecompress.quant.load import load_quantized
from moecompress.quant.packed_experts import PackedExperts, module_nbytes
path, mode, device, batch, seq, seed = sys.argv[1], sys.argv[2], sys.argv[3], *map(int, sys.argv[4:7])
res = {"rss_after_imports": hwm()}
t0 = time.perf_counter()
if mode == "base":
    m = load(path, device, torch.float32)
else:
    m = load_quantized(path, device, torch.float32, packed=(mode == "packed"))
res["load_s"] = time.perf_counter() - t0
res["rss_after_load"] = hwm()
res["resident_bytes"] = module_nbytes(m)
res["routed_resident_bytes"] = sum(module_nbytes(l.mlp.experts) for l in m.model.layers)
res["packed_layers"] = sum(isinstance(l.mlp.experts, PackedExperts) for l in m.model.layers)
ids = torch.randint(0, m.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed)).to(device)
times = []
with torch.no_grad():
    for i in range(4):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        logits = m(input_ids=ids).logits
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
res["forward_s"] = sorted(times[1:])[1]
res["rss_peak"] = hwm()
if device == "cuda":
    res["cuda_peak_allocated"] = torch.cuda.max_memory_allocated()
torch.save(logits.float().cpu(), sys.argv[7])
print(json.dumps(res))
"""


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def child(path: Path, mode: str, device: str, batch: int, seq: int, logits_out: Path) -> dict:
    """Load + forward in a fresh interpreter (its VmHWM is its own peak)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", _CHILD, str(path), mode, device, str(batch), str(seq), "0", str(logits_out)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def markdown(res: dict) -> str:
    lines = [
        "# Quantized loaders: dense dequantization at load vs packed experts dequantized on the fly",
        "",
        f"Command: `{res['command']}`  ",
        f"Model: built-in ({res['model']}), routed experts RTN uniform, other linears {res['other_bits']}-bit, "
        f"compute dtype float32; forward over {res['batch']}x{res['seq']} tokens (same tokens for every row), "
        f"median of 3 after a warm-up; torch threads 1. Host: {res['host']}.",
        "",
        "Peak RSS is VmHWM of a fresh process (Python + torch + transformers imports included; the import-only "
        "peak is its own column). Resident = bytes of the model's parameters + buffers.",
        "",
    ]
    for dev, rows in res["devices"].items():
        lines += [f"## {dev}", ""]
        if isinstance(rows, str):
            lines += [rows, ""]
            continue
        extra = " | peak CUDA alloc MiB" if dev == "cuda" else ""
        lines += [
            "| config | loader | disk MiB | resident MiB | routed experts resident MiB | peak RSS imports MiB "
            f"| peak RSS load MiB | peak RSS load+fwd MiB | forward s | logits == dense{extra} |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---|" + ("---:|" if extra else ""),
        ]
        for r in rows:
            cuda = f" | {mib(r['cuda_peak_allocated'])}" if dev == "cuda" else ""
            lines.append(
                f"| {r['config']} | {r['loader']} | {mib(r['disk_bytes'])} | {mib(r['resident_bytes'])} "
                f"| {mib(r['routed_resident_bytes'])} | {mib(r['rss_after_imports'])} | {mib(r['rss_after_load'])} "
                f"| {mib(r['rss_peak'])} | {r['forward_s']:.3f} | {r['logits_equal_dense']}{cuda} |"
            )
        lines.append("")
    lines += ["## Effects (from the rows above)", ""] + [f"- {e}" for e in res["effects"]] + [""]
    return "\n".join(lines)


def effects(rows: list[dict]) -> list[str]:
    out = []
    by = {(r["config"], r["loader"]): r for r in rows}
    for cfg in sorted({r["config"] for r in rows if r["loader"] == "packed"}):
        d, p = by[(cfg, "dense")], by[(cfg, "packed")]
        ratio = d["routed_resident_bytes"] / p["routed_resident_bytes"]
        out.append(
            f"{cfg}: packed keeps routed experts at {mib(p['routed_resident_bytes'])} MiB vs "
            f"{mib(d['routed_resident_bytes'])} MiB dense ({ratio:.1f}x less); whole model resident "
            f"{mib(p['resident_bytes'])} vs {mib(d['resident_bytes'])} MiB; peak RSS "
            f"load+fwd {mib(p['rss_peak'])} vs {mib(d['rss_peak'])} MiB ({mib(p['rss_peak'] - p['rss_after_imports'])} "
            f"vs {mib(d['rss_peak'] - d['rss_after_imports'])} MiB above the imports); "
            f"forward {p['forward_s']:.3f} s vs "
            f"{d['forward_s']:.3f} s ({p['forward_s'] / d['forward_s']:.2f}x); logits equal: {p['logits_equal_dense']}"
        )
    return out


def main() -> None:
    from moecompress.core.checkpoint import Checkpoint
    from moecompress.quant.run import run_quantize

    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--other-bits", type=int, default=8)
    ap.add_argument("--report-dir", default=str(ROOT / "reports"))
    args = ap.parse_args()
    torch.manual_seed(0)
    ckpt = Checkpoint(None)
    model = Path(ckpt.path)
    work = Path(tempfile.mkdtemp(prefix="quant-memory-"))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    res: dict = {
        "command": "OMP_NUM_THREADS=1 .venv/bin/python bench/quant_memory.py" + "".join(f" {a}" for a in sys.argv[1:]),
        "model": str(model.relative_to(ROOT)) if model.is_relative_to(ROOT) else str(model),
        "other_bits": args.other_bits,
        "batch": args.batch,
        "seq": args.seq,
        "host": f"{platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}",
        "devices": {},
    }
    t0 = time.time()
    try:
        folders = {}
        for b in (int(x) for x in args.bits.split(",")):
            folders[b] = work / f"u{b}"
            run_quantize(
                model, folders[b], bits=b, plan="uniform", method="rtn", other_bits=args.other_bits,
                samples=4, seq_len=64, batch_size=4,
            )  # fmt: skip
        for dev in devices:
            rows = []
            r = child(model, "base", dev, args.batch, args.seq, work / "base.pt")
            rows.append({"config": "base (bf16 on disk)", "loader": "from_pretrained", "disk_bytes": disk_bytes(model),
                         "logits_equal_dense": "-", **r})  # fmt: skip
            for b, folder in folders.items():
                for mode in ("dense", "packed"):
                    r = child(folder, mode, dev, args.batch, args.seq, work / f"{b}-{mode}.pt")
                    same = "-"
                    if mode == "packed":
                        a, d = torch.load(work / f"{b}-packed.pt"), torch.load(work / f"{b}-dense.pt")
                        same = bool(torch.equal(a, d))
                    rows.append({"config": f"uniform {b}-bit", "loader": mode, "disk_bytes": disk_bytes(folder),
                                 "logits_equal_dense": same, **r})  # fmt: skip
                    print(f"{dev} {b}-bit {mode}: {r}", flush=True)
            res["devices"][dev] = rows
        if "cuda" not in devices:
            res["devices"]["cuda"] = "No CUDA device here (see tests/quant/test_quant_packed.py, gpu mark)."
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["effects"] = effects(res["devices"]["cpu"])
    res["elapsed_s"] = round(time.time() - t0, 1)
    rep = Path(args.report_dir)
    rep.mkdir(parents=True, exist_ok=True)
    (rep / "quant_memory.json").write_text(json.dumps(res, indent=2) + "\n")
    md = markdown(res)
    (rep / "quant_memory.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
