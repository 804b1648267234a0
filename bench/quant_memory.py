"""Memory and speed of the two quantized loaders on the built-in model: routed experts dequantized to dense at load
time (``load_quantized(packed=False)``) vs kept packed and dequantized on the fly (``packed=True``, PackedExperts).

The built-in model is quantized uniformly at 4 and 3 bits (RTN routed experts, ``--other-bits 8`` as the CLI
default). For the bf16 input and each (width, loader): bytes on disk (safetensors files), bytes of parameters +
buffers resident in the loaded model (all and routed experts only), peak RSS (VmHWM of a fresh process: after
imports, after load, after load + forwards), forward time (median of 3 forwards over the same tokens after one
warm-up), and whether the logits equal the dense loader's. On CUDA (when present) the same runs on the GPU with
torch.cuda.max_memory_allocated as the peak.

    OMP_NUM_THREADS=1 .venv/bin/python bench/quant_memory.py     # writes reports/quant_memory.json + .md

``--layer``: peak RSS of GPTQ-quantizing one synthetic routed layer (bf16 weights, random routed tokens, uniform
4 bits, sequential GPTQ) with the per-layer code before the chunked Hessians (``--before-rev``: quant/layer.py of
that commit, whose capture holds [E, H, H] for the whole layer) and with today's code at several --max-memory
bounds (Hessians for a chunk of experts at a time). Each row runs in a fresh interpreter; the codes of every row
are compared with the first's. Writes reports/quant_memory.layer.json + .md.

    OMP_NUM_THREADS=1 .venv/bin/python bench/quant_memory.py --layer --hidden 1024 --experts 128 --width 384

``--peaks CASE``: where the memory of one ``moecompress quantize`` run goes. The case's synthetic bf16 checkpoint
(bench/scale_bench.py CASES, e.g. qwen3-30b-layer, or layers x hidden x experts x width x top-k, e.g. 1x2048x32x768x8)
is generated, the command (``--argv``, default a uniform 4-bit
GPTQ) runs in a fresh process whose side thread samples VmRSS every 20 ms together with the main thread's
moecompress call stack; the report lists the largest RSS seen in each innermost moecompress function (the stage)
and the peak (VmHWM). Writes reports/quant_memory.peaks.<case>.<label>.json + .md (``--label``).

    flock /tmp/moec_big.lock env OMP_NUM_THREADS=1 .venv/bin/python bench/quant_memory.py --peaks qwen3-30b-layer \
        --argv "quantize --bits 3" --label lp
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


_LAYER_CHILD = r"""
import hashlib, importlib.util, json, sys, time, torch
def hwm():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1]) * 1024
torch.set_num_threads(1)
from moecompress.core import limits
from moecompress.core.experts import routed_forward
mode, H, E, I, T, k, limit, old_path = sys.argv[1], *map(int, sys.argv[2:8]), sys.argv[8]
if mode == "before":
    spec = importlib.util.spec_from_file_location("layer_before", old_path)
    L = importlib.util.module_from_spec(spec)
    sys.modules["layer_before"] = L
    spec.loader.exec_module(L)
else:
    from moecompress.quant import layer as L
    limits.set_memory_limit(limit or None)
g = torch.Generator().manual_seed(0)
gu = torch.empty(E, 2 * I, H, dtype=torch.bfloat16)  # filled per expert: no float32 copy of the layer
dn = torch.empty(E, H, I, dtype=torch.bfloat16)
for e in range(E):
    gu[e] = torch.randn(2 * I, H, generator=g) / H**0.5
    dn[e] = torch.randn(H, I, generator=g) / I**0.5
res = {"rss_weights": hwm()}
cap = L.LayerCapture(E, H, I, with_down=False)
for b0 in range(0, T, 512):
    x = torch.randn(min(512, T - b0), H, generator=g)
    logits = x @ torch.randn(H, E, generator=g)
    w, idx = torch.topk(torch.softmax(logits, -1), k)
    cap.add_batch(x, idx, w / w.sum(-1, keepdim=True))
    routed_forward(gu, dn, torch.nn.functional.silu, x.to(torch.bfloat16), idx, w.to(torch.bfloat16), cap.observer())
res["rss_capture"] = hwm()
t0 = time.time()
opts = L.GPTQOptions() if mode == "before" else L.GPTQOptions(damp=0.01, refine=False)  # the before's choices
codes, used, err = L.quantize_layer(gu, dn, torch.nn.functional.silu, (4,), "gptq", cap, 32, torch.bfloat16,
                                    torch.bfloat16, opts)
res["quantize_s"] = round(time.time() - t0, 1)
res["rss_peak"] = hwm()
q = codes[4]
h = hashlib.sha256()
for t in (q.gate_up_q, q.gate_up_s, q.down_q, q.down_s):
    h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
res["codes_sha256"] = h.hexdigest()
res["gptq_experts"] = used.count("gptq")
res["chunk"] = E if mode == "before" else L.hessian_chunk(E, H, I, False, torch.device("cpu"))
print(json.dumps(res))
"""


def layer_bench(args: argparse.Namespace) -> None:
    """Peak RSS of one synthetic layer's GPTQ, before (whole-layer Hessians) and after (chunked) (see --layer)."""
    work = Path(tempfile.mkdtemp(prefix="quant-memory-layer-"))
    old = work / "layer_before.py"
    old.write_text(
        subprocess.run(
            ["git", "show", f"{args.before_rev}:moecompress/quant/layer.py"], cwd=ROOT, capture_output=True,
            text=True, check=True,
        ).stdout
    )  # fmt: skip
    H, E, I, T, k = args.hidden, args.experts, args.width, args.tokens, args.topk
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    rows = []
    runs = [("before", 0)] + [("after", int(float(x) * 2**20)) for x in args.limits_mib.split(",")]
    t0 = time.time()
    try:
        for mode, limit in runs:
            cmd = [sys.executable, "-c", _LAYER_CHILD, mode, *map(str, (H, E, I, T, k, limit)), str(old)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode != 0:
                raise RuntimeError(out.stderr[-3000:])
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r.update(mode=mode, max_memory=limit or None)
            rows.append(r)
            print(r, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    layer_bytes = E * 3 * I * H * 2
    res = {
        "command": "OMP_NUM_THREADS=1 .venv/bin/python bench/quant_memory.py" + "".join(f" {a}" for a in sys.argv[1:]),
        "shape": {"hidden": H, "experts": E, "width": I, "tokens": T, "top_k": k},
        "layer_bf16_bytes": layer_bytes,
        "whole_layer_hessian_bytes": E * H * H * 4,
        "before_rev": args.before_rev,
        "host": f"{platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}",
        "elapsed_s": round(time.time() - t0, 1),
        "rows": rows,
        "codes_equal": all(r["codes_sha256"] == rows[0]["codes_sha256"] for r in rows),
    }
    lines = [
        "# GPTQ of one routed layer: peak RSS with whole-layer Hessians (before) and chunked Hessians (after)",
        "",
        f"Command: `{res['command']}` ({res['elapsed_s']} s; host {res['host']}).  ",
        f"Synthetic layer: E {E}, H {H}, I {I} (bf16, {mib(layer_bytes)} MiB), {T} tokens, top-{k}; uniform 4-bit "
        f"sequential GPTQ of every expert (experts with < 32 routed tokens by RTN; the GPTQ choices of the before: "
        "damp 0.01, no scale refinement). Before: quant/layer.py of "
        f"{args.before_rev} (H_gu [E, H, H] for the layer: {mib(E * H * H * 4)} MiB). After: today's code, with "
        "--max-memory set as in the row (Hessians of a chunk of experts: a quarter of the bound). Peak RSS is "
        "VmHWM of a fresh process, imports and the synthetic weights included.",
        "",
        "| code | --max-memory | experts per chunk | peak RSS after weights MiB | after capture MiB | peak MiB "
        "| quantize s | GPTQ experts | codes equal to before |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lim = "-" if r["max_memory"] is None else f"{mib(r['max_memory'])} MiB"
        lines.append(
            f"| {r['mode']} | {lim} | {r['chunk']} | {mib(r['rss_weights'])} | {mib(r['rss_capture'])} "
            f"| {mib(r['rss_peak'])} | {r['quantize_s']} | {r['gptq_experts']} "
            f"| {r['codes_sha256'] == rows[0]['codes_sha256']} |"
        )
    lines.append("")
    rep = Path(args.report_dir)
    rep.mkdir(parents=True, exist_ok=True)
    (rep / "quant_memory.layer.json").write_text(json.dumps(res, indent=2) + "\n")
    (rep / "quant_memory.layer.md").write_text("\n".join(lines))
    print("\n".join(lines))


_PEAKS_CHILD = r"""
import json, os, sys, threading, time
def status(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
main_id = threading.main_thread().ident
seen, order, done = {}, [], []
def stack():
    f = sys._current_frames().get(main_id)
    names = []
    while f is not None:
        fn = f.f_code.co_filename
        if "/moecompress/" in fn:
            names.append(fn.split("/moecompress/")[-1][:-3] + "." + f.f_code.co_name)
        f = f.f_back
    return " < ".join(names[:3]) or "(imports / outside moecompress)"
def sample():
    while not done:
        k, r = stack(), status("VmRSS:")
        if k not in seen:
            order.append(k)
        seen[k] = max(seen.get(k, 0), r)
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
import moecompress
from moecompress.cli.main import app
t0, c0 = time.time(), os.times()
code = 0
try:
    app(sys.argv[1:], standalone_mode=False)
except SystemExit as e:
    code = int(e.code or 0)
done.append(1)
c1 = os.times()
print(json.dumps({"code": code, "peak_rss": status("VmHWM:"), "wall_s": round(time.time() - t0, 1),
                  "cpu_s": round(c1.user - c0.user + c1.system - c0.system, 1),
                  "stages": [[k, seen[k]] for k in order], "module": moecompress.__file__}))
"""


def peaks_bench(args: argparse.Namespace) -> None:
    """RSS per stage of one quantize run on a synthetic case (see --peaks)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from profile_bench import synthetic_checkpoint
    from scale_bench import CASES

    L, H, E, I, k = CASES[args.peaks] if args.peaks in CASES else map(int, args.peaks.split("x"))
    work = Path(tempfile.mkdtemp(prefix="quant-peaks-", dir=args.work))
    code = Path(args.code).resolve() if args.code else ROOT
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(code), "MOECOMPRESS_QUIET": "1"}
    try:
        model = work / args.peaks
        size = synthetic_checkpoint(model, L, H, E, I, k)
        argv = args.argv.split()
        cmd = [argv[0], str(model), *argv[1:], "-o", str(work / "out"), "--samples", str(args.samples), "--seq-len",
               str(args.seq_len), "--device", "cpu"]  # fmt: skip
        out = subprocess.run(  # cwd elsewhere: `python -c` puts the cwd first on sys.path, before PYTHONPATH
            [sys.executable, "-c", _PEAKS_CHILD, *cmd], capture_output=True, text=True, env=env, cwd=work
        )
        if out.returncode == 0 and not json.loads(out.stdout.splitlines()[-1])["module"].startswith(str(code)):
            raise RuntimeError(f"the child imported moecompress from outside {code}")
        lines = [x for x in out.stdout.splitlines() if x.startswith("{")]
        if out.returncode or not lines:
            raise RuntimeError(out.stderr[-3000:])
        r = json.loads(lines[-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    layer = E * 3 * I * H * 2
    res = {
        "command": "OMP_NUM_THREADS=1 .venv/bin/python bench/quant_memory.py" + "".join(f" {a!r}" if " " in a
                                                                                  else f" {a}" for a in sys.argv[1:]),
        "case": args.peaks, "shape": {"layers": L, "hidden": H, "experts": E, "width": I, "top_k": k},
        "argv": args.argv, "tokens": args.samples * args.seq_len, "checkpoint_bytes": size,
        "routed_layer_bf16_bytes": layer, "code": str(code), "commit": args.code_label or subprocess.run(
            ["git", "log", "-1", "--format=%h"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
        **r,
    }  # fmt: skip
    lines = [
        f"# Peak RSS per stage: `{args.argv}` on {args.peaks}",
        "",
        f"Command: `{res['command']}` (commit {res['commit']}).  ",
        f"Case {args.peaks}: {L} layer(s), H {H}, E {E}, I {I}, top-{k}; one routed layer {mib(layer)} MiB in bf16; "
        f"{res['tokens']:,} calibration tokens; one thread. RSS sampled every 20 ms with the main thread's innermost "
        "moecompress frames (the stage); peak = VmHWM of the process.",
        "",
        f"Peak {mib(r['peak_rss'])} MiB = {r['peak_rss'] / layer:.2f}x the routed layer; {r['cpu_s']} CPU s, "
        f"{r['wall_s']} s wall; exit {r['code']}.",
        "",
        "| stage (innermost moecompress frames) | max RSS MiB | x layer |",
        "|---|---:|---:|",
    ]
    top = sorted(r["stages"], key=lambda x: -x[1])[: args.top]
    for key, v in top:
        lines.append(f"| {key} | {mib(v)} | {v / layer:.2f} |")
    lines.append("")
    rep = Path(args.report_dir)
    rep.mkdir(parents=True, exist_ok=True)
    stem = rep / f"quant_memory.peaks.{args.peaks}.{args.label}"
    Path(f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    Path(f"{stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))


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
    ap.add_argument("--layer", action="store_true", help="GPTQ of one synthetic layer: whole-layer vs chunked Hessians")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--limits-mib", default="1024,128", help="--max-memory of the 'after' rows (MiB)")
    ap.add_argument("--before-rev", default="de10cf3", help="commit whose quant/layer.py is the 'before'")
    ap.add_argument(
        "--peaks", default=None, help="a bench/scale_bench.py case or LxHxExIxK: RSS per stage of one quantize run"
    )
    ap.add_argument("--argv", default="quantize --bits 4 --plan uniform", help="--peaks: the command (no MODEL)")
    ap.add_argument("--label", default="gptq", help="--peaks: report name suffix")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--top", type=int, default=25, help="--peaks: stages listed")
    ap.add_argument("--work", default=None, help="--peaks: folder for the synthetic checkpoint")
    ap.add_argument("--code", default=None, help="--peaks: run this checkout's moecompress (default: this one)")
    ap.add_argument("--code-label", default=None, help="--peaks: the commit --code holds, for the report")
    args = ap.parse_args()
    if args.peaks:
        peaks_bench(args)
        return
    if args.layer:
        layer_bench(args)
        return
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
