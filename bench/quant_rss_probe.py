"""Labelled VmRSS/VmHWM probe of `quantize --bits 4 --plan uniform` (GPTQ) on a checkpoint (Linux): each wrapped
call logs a JSON line at entry and exit (MiB: rss, hwm, anon), VmHWM reset through /proc/self/clear_refs at entry, so
an exit's hwm is that call's peak and an entry's hwm the peak since the previous wrapped call; at the engine's phase
points also the live torch tensors (>= 1 MiB storages, by shape). FINE=1 also wraps quant/layer.py's helpers.

    OMP_NUM_THREADS=1 MOECOMPRESS_QUIET=1 .venv/bin/python bench/quant_rss_probe.py MODEL OUT SAMPLES SEQ_LEN

MODEL: e.g. a synthetic E16 (bench/profile_bench.py synthetic_checkpoint(folder, 2, 512, 16, 256, 8)).
"""

import gc
import json
import os
import sys
import time

import torch

LOG = []
MB = 1 << 20


def status():
    d = {}
    for line in open("/proc/self/status"):
        k = line.split(":", 1)[0]
        if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            d[k] = int(line.split()[1]) * 1024
    return d


def reset_hwm():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def live_tensors(top=8):
    seen, by = set(), {}
    for o in gc.get_objects():
        try:
            if not isinstance(o, torch.Tensor):
                continue
            st = o.untyped_storage()
            p = st.data_ptr()
            if p in seen or st.nbytes() < MB:
                continue
            seen.add(p)
            key = f"{tuple(o.shape)} {o.dtype}"
            by[key] = by.get(key, 0) + st.nbytes()
        except Exception:
            pass
    tot = sum(by.values())
    return round(tot / MB, 1), sorted(((round(v / MB, 1), k) for k, v in by.items()), reverse=True)[:top]


def probe(at, tensors=False):
    s = status()
    rec = {"at": at, "rss": round(s["VmRSS"] / MB), "hwm": round(s["VmHWM"] / MB), "anon": round(s["RssAnon"] / MB)}
    if tensors:
        rec["live"] = live_tensors()
    LOG.append(rec)
    print(json.dumps(rec), flush=True)


def wrap(mod, name, label, tensors=False, reset=True):
    f = getattr(mod, name)

    def g(*a, **k):
        probe(f"{label} <", tensors)
        if reset:
            reset_hwm()
        r = f(*a, **k)
        probe(f"{label} >", tensors)
        return r

    setattr(mod, name, g)


def main():
    model, out, samples, seq = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    from moecompress.core import engine as eng
    from moecompress.core import output as outmod
    from moecompress.core import stream
    from moecompress.quant import layer as ql
    from moecompress.quant import transform as qt

    wrap(eng.Engine, "moe_inputs", "moe_inputs", tensors=True)
    wrap(eng.Engine, "forward", "forward", tensors=True)
    wrap(qt, "capture_layer", "capture_layer", tensors=True)
    wrap(qt, "quantize_layer", "quantize_layer", tensors=True)
    wrap(ql.LayerCapture, "hessians", "hessians")
    if os.environ.get("FINE"):
        wrap(ql.LayerCapture, "routed", "routed")
        wrap(ql, "_expert_out", "expert_out")
        wrap(ql, "gptq_quantize_batched", "gptqb")
        wrap(ql, "prepare_hessian_batched", "prepb")
        wrap(ql, "gptq_quantize", "gptq1")
        wrap(ql, "prepare_hessian", "prep1")
    wrap(stream.LayerStream, "capture", "stream.capture", tensors=True)
    wrap(outmod.Output, "add_layer", "add_layer")
    wrap(outmod.Output, "finish", "finish", tensors=True)
    from moecompress.quant.run import run_quantize

    probe("start")
    t = time.process_time()
    run_quantize(
        model, out, bits=4, plan="uniform", method="gptq", samples=samples, seq_len=seq, overwrite=True,
        device=torch.device("cpu"),
    )  # fmt: skip
    probe("end")
    print(json.dumps({"cpu_s": round(time.process_time() - t, 1), "max_hwm_mib": max(r["hwm"] for r in LOG)}))


main()
