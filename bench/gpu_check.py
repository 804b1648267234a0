"""One prepared GPU check: every moecompress operation with --device cuda, compared with the same run on CPU.

Parts (``--parts``; each op checks the time budget first and is recorded as skipped when it would not fit; an op
that raises is recorded with its error and the run goes on). They run in the order 1 (device), 3, 4, 5, then 1 on
the CPU and 2, so that the GPU-only parts never wait for the slower CPU reference:

1. ``builtin``: on MODEL (default: the built-in model) run ``profile``, ``prune`` (25% of experts: REAP order from
   the profile, and the default output-error search), ``quantize`` (GPTQ, uniform 4 and 3 bits), ``prune
   --granularity atom`` (HEAPr, 25% of channels) and ``eval`` (of the 4-bit and the pruned model against the base)
   through the CLI, on the device and on the CPU. Each op is timed (CUDA events on cuda, wall clock on both) with
   its peak GPU memory (``torch.cuda.max_memory_allocated`` after a reset).
2. ``compare``: the device's outputs against the CPU's, within the tolerances in ``TOL`` (profile statistics:
   relative L2 per tensor and routed-token counts; pruning: the kept-expert/channel lists; quantization: the
   fraction of identical codes and the scales; eval: KL(base || model), top-1 agreement and perplexity).
3. ``kernel``: the 4-bit model loaded packed on the device; logits of the fused Triton kernel vs the torch
   unpacking path vs the CPU dense loader.
4. ``big``: a synthetic checkpoint shaped like Qwen3-30B-A3B's MoE layers (hidden 2048, 128 experts of width 768,
   top-8, 32 query / 4 KV heads of 128) with ``--big-layers`` layers (default 2) and the built-in tokenizer (vocab
   8192), made on the machine in bf16; ``profile`` and ``quantize`` (GPTQ 4-bit) on the device, timed, peak memory
   recorded.
6. ``bigops``: on the same big checkpoint on the device, the default ``prune`` (output-error search, 50% of
   experts, from the big profile), ``prune --granularity atom`` (HEAPr, 25% of channels) and ``merge`` (50%, from
   the big profile), timed with their peak GPU memory (needs ``big``'s profile; run as ``--parts big,bigops``).
5. ``throughput``: tokens/s of one-token forwards (no KV cache) at batch 1 and 64 of the big 4-bit model with packed
   experts (Triton kernel, and the torch unpacking path) vs the dense bf16 model (transformers' default experts
   kernel and the eager loop), CUDA events, median of ``--iters``.

Writes one JSON (``--out``, default reports/gpu_check.json). ``--device cpu --quick`` runs everything on CPU with
tiny sizes (the test suite runs it so the script cannot rot); there the device and the reference are both CPU.

    python3 bench/gpu_check.py --device cuda                       # on the GPU machine: see bench/GPU_CHECK.md
    OMP_NUM_THREADS=1 .venv/bin/python bench/gpu_check.py --device cpu --quick --out /tmp/gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("MOECOMPRESS_QUIET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# Tolerances of the device-vs-CPU comparison (stated here, recorded in the JSON). Float statistics differ by the
# GEMM kernels' summation order; a routing decision that flips on a near-tie moves a few tokens between experts.
TOL = {
    "profile_rel_l2": 1e-2,  # ||dev - cpu|| / ||cpu|| per float profile tensor
    "profile_tokens_moved": 1e-2,  # sum |dev - cpu| / sum cpu of the routed-token counts
    "kept_jaccard": 0.9,  # |kept_dev & kept_cpu| / |kept_dev | kept_cpu| per layer, minimum
    "codes_equal": 0.95,  # fraction of identical quantized codes (GPTQ propagates any flip along a row)
    "codes_max_abs_diff": 2,  # largest code difference
    "float_rel_l2": 1e-2,  # other tensors of an output (scales, kept weights)
    "kl_rel": 0.05,  # |KL_dev - KL_cpu| <= kl_rel * KL_cpu + kl_abs
    "kl_abs": 1e-4,
    "ppl_rel": 1e-2,
    "top1_abs": 0.01,
    "kernel_logits_rel": 1e-2,  # packed Triton vs torch path logits, relative max abs
}

QWEN3_30B = dict(  # the MoE-relevant shapes of Qwen/Qwen3-30B-A3B's config.json
    hidden_size=2048,
    moe_intermediate_size=768,
    intermediate_size=6144,
    num_experts=128,
    num_experts_per_tok=8,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=128,
)
TINY_BIG = dict(
    hidden_size=64,
    moe_intermediate_size=32,
    intermediate_size=64,
    num_experts=8,
    num_experts_per_tok=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)


PARTS = ("builtin", "kernel", "big", "bigops", "throughput")


class Budget:
    def __init__(self, seconds: float):
        self.t0 = time.monotonic()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.seconds - self.elapsed()


def sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def timed(dev: str, fn: Callable[[], Any]) -> tuple[Any, dict[str, Any]]:
    """Run ``fn``; wall seconds, and on cuda CUDA-event seconds and peak allocated bytes during the call."""
    rec: dict[str, Any] = {}
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t = time.perf_counter()
    out = fn()
    if dev == "cuda":
        end.record()
        torch.cuda.synchronize()
        rec["cuda_event_s"] = round(start.elapsed_time(end) / 1000, 4)
        rec["peak_cuda_bytes"] = int(torch.cuda.max_memory_allocated())
    rec["wall_s"] = round(time.perf_counter() - t, 4)
    return out, rec


def cli(args: list[str]) -> None:
    """Run one moecompress command in this process; a non-zero exit is an error."""
    from moecompress.cli.main import app

    try:
        code = app(args, standalone_mode=False, prog_name="moecompress")
    except SystemExit as e:
        code = e.code
    if code not in (None, 0):
        raise RuntimeError(f"moecompress {' '.join(args)} exited with {code}")


def error_record(err: BaseException) -> dict[str, Any]:
    tb = traceback.format_exception(type(err), err, err.__traceback__)
    return {"ok": False, "error": f"{type(err).__name__}: {err}"[:2000], "traceback": "".join(tb)[-4000:]}


class Runner:
    """Records every op and part: ok + measurements, error + traceback, or skipped + reason."""

    def __init__(self, budget: Budget, res: dict[str, Any], out: Path):
        self.budget = budget
        self.res = res
        self.out = out

    def save(self) -> None:
        self.res["elapsed_s"] = round(self.budget.elapsed(), 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.res, indent=1, default=str) + "\n")

    def fits(self, section: dict[str, Any], name: str, est_s: float, needs: list[str] | None = None) -> bool:
        for n in needs or []:
            if not section.get(n, {}).get("ok"):
                section[name] = {"ok": False, "skipped": f"needs {n}, which did not succeed"}
                return False
        if self.budget.left() < est_s:
            section[name] = {
                "ok": False,
                "skipped": f"time budget: {self.budget.left():.0f} s left, about {est_s:.0f} s needed",
            }
            self.res["budget_exhausted"] = True
            return False
        return True

    def op(self, section: dict[str, Any], name: str, dev: str, fn: Callable[[], Any], est_s: float,
           needs: list[str] | None = None) -> Any:  # fmt: skip
        if not self.fits(section, name, est_s, needs):
            return None
        print(f"[{self.budget.elapsed():6.1f}s] {name} on {dev} ...", flush=True)
        try:
            out, rec = timed(dev, fn)
            section[name] = {"ok": True, "device": dev, **rec}
            if isinstance(out, dict):
                section[name].update(out)
        except Exception as err:  # recorded, the run goes on
            section[name] = {"device": dev, **error_record(err)}
            out = None
            if dev == "cuda":
                torch.cuda.empty_cache()
        print(f"[{self.budget.elapsed():6.1f}s] {name}: {'ok' if section[name].get('ok') else 'FAILED'}", flush=True)
        self.save()
        return out

    def cmd(self, section: dict[str, Any], name: str, dev: str, args: list[str], est_s: float,
            needs: list[str] | None = None) -> None:  # fmt: skip
        """One moecompress command as an op (``--device dev`` appended)."""
        self.op(section, name, dev, lambda: cli([*args, "--device", dev]), est_s, needs)


# ---- part 1: the pipeline on one device ------------------------------------------------------------------------
def pipeline(run: Runner, model: str, dev: str, work: Path, size: dict[str, int], section: dict[str, Any]) -> None:
    d = work / dev
    d.mkdir(parents=True, exist_ok=True)
    calib = ["--samples", str(size["samples"]), "--seq-len", str(size["seq_len"]), "--batch-size", "8"]
    est = size["est_s"]
    prof = ["--profile", str(d / "profile")]
    run.cmd(section, "profile", dev, ["profile", model, "-o", str(d / "profile"), *calib], est)
    reap = ["prune", model, "--ratio", "0.25", "--method", "reap", *prof, "-o", str(d / "pruned"), *calib]
    run.cmd(section, "prune_reap", dev, reap, est, needs=["profile"])
    outerr = ["prune", model, "--ratio", "0.25", *prof, "-o", str(d / "pruned_outerr"), *calib]  # the default method
    run.cmd(section, "prune_output_error", dev, outerr, est, needs=["profile"])
    for b in (4, 3):
        q = ["quantize", model, "--bits", str(b), "--plan", "uniform", "--method", "gptq", "-o", str(d / f"q{b}")]
        run.cmd(section, f"quantize_gptq{b}", dev, [*q, *calib], 2 * est)
    atom = ["prune", model, "--granularity", "atom", "--ratio", "0.25", "-o", str(d / "atom"), *calib]
    run.cmd(section, "prune_atom_heapr", dev, atom, 2 * est)
    ev = ["--max-windows", str(size["eval_windows"]), "--seq-len", str(size["seq_len"])]
    for name, folder, need in (("eval_q4", "q4", "quantize_gptq4"), ("eval_pruned", "pruned", "prune_reap")):
        e = ["eval", str(d / folder), "--base", model, *ev, "--json", str(d / f"{name}.json")]
        run.cmd(section, name, dev, e, est, needs=[need])


# ---- part 2: comparisons -----------------------------------------------------------------------------------------
def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def compare_profile(a: Path, b: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    ta, tb = load_file(str(a / "profile.safetensors")), load_file(str(b / "profile.safetensors"))
    rel: dict[str, float] = {}
    moved = total = 0.0
    for k in sorted(tb):
        if k not in ta or ta[k].shape != tb[k].shape:
            return {"ok": False, "error": f"profile tensor {k} missing or of another shape on the device"}
        if k.endswith(".tokens") or k.endswith("domain_counts"):
            moved += float((ta[k].double() - tb[k].double()).abs().sum())
            total += float(tb[k].double().abs().sum())
        elif ta[k].is_floating_point():
            rel[k] = _rel_l2(ta[k], tb[k])
    worst = max(rel, key=rel.get) if rel else None
    tokens_moved = moved / max(total, 1.0)
    ok = (worst is None or rel[worst] <= TOL["profile_rel_l2"]) and tokens_moved <= TOL["profile_tokens_moved"]
    return {
        "ok": ok,
        "tensors": len(tb),
        "max_rel_l2": rel.get(worst, 0.0) if worst else 0.0,
        "worst_tensor": worst,
        "tokens_moved_frac": tokens_moved,
    }


def _kept_lists(obj: Any, path: str = "") -> dict[str, list]:
    """Every list under a key named kept* in a manifest, by its JSON path."""
    out: dict[str, list] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            p = f"{path}/{k}"
            if k.startswith("kept") and isinstance(v, list):
                out[p] = v
            else:
                out.update(_kept_lists(v, p))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.update(_kept_lists(v, f"{path}/{i}"))
    return out


def _flat(v: list) -> set:
    """A kept list as a set of items; nested lists (kept channels per expert) as (position, item) pairs."""
    s: set = set()
    for i, x in enumerate(v):
        s |= {(i, y) for y in _flat(x)} if isinstance(x, list) else {x}
    return s


def compare_outputs(a: Path, b: Path) -> dict[str, Any]:
    """Two output folders of one op: kept lists of the manifests, quantized codes, every other tensor."""
    from moecompress.quant.ctformat import scheme_of
    from moecompress.quant.pack import unpack_int32

    res: dict[str, Any] = {}
    ma, mb = (json.loads((x / "moecompress.json").read_text()) for x in (a, b))
    ka, kb = _kept_lists(ma), _kept_lists(mb)
    jac = []
    for p in kb:
        sa, sb = _flat(ka.get(p, [])), _flat(kb[p])
        jac.append(len(sa & sb) / max(len(sa | sb), 1))
    ch = [x / "atomic_channels.json" for x in (a, b)]
    if ch[1].exists():  # atomic pruning: kept channels per layer and expert
        ca, cb = (json.loads(x.read_text()) if x.exists() else {} for x in ch)
        for l in cb:
            sa, sb = _flat(ca.get(l, [])), _flat(cb[l])
            jac.append(len(sa & sb) / max(len(sa | sb), 1))
        ka, kb = {**ka, "channels": ca}, {**kb, "channels": cb}
    res["kept_lists"] = len(jac)
    res["kept_min_jaccard"] = min(jac) if jac else None
    res["kept_identical"] = ka == kb
    ta, tb = _tensors(a), _tensors(b)
    if set(ta) != set(tb):
        res.update(ok=False, error=f"tensor names differ: {sorted(set(ta) ^ set(tb))[:4]}")
        return res
    qcfg = json.loads((b / "config.json").read_text()).get("quantization_config") or {}
    same = n = 0
    max_code = 0
    float_rel: dict[str, float] = {}
    for k, vb in tb.items():
        va = ta[k]
        if va.shape != vb.shape:
            res.update(ok=False, error=f"{k}: shape {tuple(va.shape)} vs {tuple(vb.shape)}")
            return res
        if k.endswith(".weight_packed"):
            base = k[: -len(".weight_packed")]
            bits = scheme_of(qcfg, base)[0]
            cols = int(tb[base + ".weight_shape"][1])
            qa, qb = unpack_int32(va, bits, cols), unpack_int32(vb, bits, cols)
            same += int((qa == qb).sum())
            n += qa.numel()
            max_code = max(max_code, int((qa.int() - qb.int()).abs().max()))
        elif vb.is_floating_point():
            float_rel[k] = _rel_l2(va, vb)
    worst = max(float_rel, key=float_rel.get) if float_rel else None
    res["float_tensors"] = len(float_rel)
    res["float_max_rel_l2"] = float_rel[worst] if worst else 0.0
    res["float_worst"] = worst
    ok = (res["kept_min_jaccard"] or 1.0) >= TOL["kept_jaccard"]
    if res["kept_identical"]:  # the same experts/channels kept: the tensors themselves must agree
        ok = ok and res["float_max_rel_l2"] <= TOL["float_rel_l2"]
    else:  # a flipped near-tie changes whole rows; the Jaccard bound above is the verdict
        res["note"] = "kept sets differ: float_max_rel_l2 reflects different rows, not numerics"
    if n:
        res["codes"] = n
        res["codes_equal_frac"] = same / n
        res["codes_max_abs_diff"] = max_code
        ok = ok and same / n >= TOL["codes_equal"] and max_code <= TOL["codes_max_abs_diff"]
    res["ok"] = ok
    return res


def compare_eval(a: Path, b: Path) -> dict[str, Any]:
    ea, eb = json.loads(a.read_text()), json.loads(b.read_text())
    res = {"kl_dev": ea["kl_to_base"], "kl_cpu": eb["kl_to_base"], "top1_dev": ea["top1_agreement"],
           "top1_cpu": eb["top1_agreement"], "ppl_all_dev": ea["perplexity"]["all"],
           "ppl_all_cpu": eb["perplexity"]["all"], "peak_memory_bytes_dev": ea.get("peak_memory_bytes")}  # fmt: skip
    ok = abs(res["kl_dev"] - res["kl_cpu"]) <= TOL["kl_rel"] * res["kl_cpu"] + TOL["kl_abs"]
    ok = ok and abs(res["top1_dev"] - res["top1_cpu"]) <= TOL["top1_abs"]
    ok = ok and abs(res["ppl_all_dev"] / res["ppl_all_cpu"] - 1) <= TOL["ppl_rel"]
    return {"ok": ok, **res}


def compare_all(run: Runner, work: Path, dev: str, ref: str, sec_dev: dict, sec_ref: dict, out: dict) -> None:
    a, b = work / dev, work / ref
    checks = [
        ("profile", "profile", lambda: compare_profile(a / "profile", b / "profile")),
        ("prune_reap", "prune_reap", lambda: compare_outputs(a / "pruned", b / "pruned")),
        (
            "prune_output_error",
            "prune_output_error",
            lambda: compare_outputs(a / "pruned_outerr", b / "pruned_outerr"),
        ),  # fmt: skip
        ("quantize_gptq4", "quantize_gptq4", lambda: compare_outputs(a / "q4", b / "q4")),
        ("quantize_gptq3", "quantize_gptq3", lambda: compare_outputs(a / "q3", b / "q3")),
        ("prune_atom_heapr", "prune_atom_heapr", lambda: compare_outputs(a / "atom", b / "atom")),
        ("eval_q4", "eval_q4", lambda: compare_eval(a / "eval_q4.json", b / "eval_q4.json")),
        ("eval_pruned", "eval_pruned", lambda: compare_eval(a / "eval_pruned.json", b / "eval_pruned.json")),
    ]
    for name, op, fn in checks:
        if not (sec_dev.get(op, {}).get("ok") and sec_ref.get(op, {}).get("ok")):
            out[name] = {"ok": False, "skipped": f"{op} did not succeed on both devices"}
            continue
        try:
            out[name] = fn()
        except Exception as err:
            out[name] = error_record(err)
    run.save()


# ---- part 3: the fused kernel on the 4-bit model -----------------------------------------------------------------
def kernel_check(folder: Path, dev: str, seq_len: int) -> dict[str, Any]:
    from moecompress.quant import triton_pack
    from moecompress.quant.load import load_quantized
    from moecompress.quant.packed_experts import PackedExperts, set_kernel

    cpu = load_quantized(folder, "cpu", torch.float32, packed=False)
    ids = torch.randint(0, cpu.config.vocab_size, (4, seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = cpu(input_ids=ids).logits.float()
    del cpu
    m = load_quantized(folder, dev, torch.float32, packed=True)
    res: dict[str, Any] = {"packed_layers": sum(isinstance(x, PackedExperts) for x in m.modules())}
    res["triton_available"] = triton_pack.available(torch.empty(0, device=dev))
    scale = float(ref.abs().max())
    for kernel in ("torch", "triton"):
        if kernel == "triton" and not res["triton_available"]:
            res["triton"] = "not available on this device (Triton missing, or CPU without TRITON_INTERPRET=1)"
            continue
        set_kernel(m, kernel)
        with torch.no_grad():
            got = m(input_ids=ids.to(dev)).logits.float().cpu()
        res[f"{kernel}_vs_cpu_dense_rel_max_abs"] = float((got - ref).abs().max()) / scale
    worst = max(v for k, v in res.items() if k.endswith("_rel_max_abs"))
    res["ok"] = worst <= TOL["kernel_logits_rel"]
    return res


# ---- part 4: a synthetic Qwen3-30B-shaped slice ------------------------------------------------------------------
def make_big(path: Path, layers: int, shapes: dict[str, int], dev: str, seed: int = 0) -> dict[str, Any]:
    """Random bf16 weights (std 0.02, norms 1) in hub format, one safetensors shard per layer, made on ``dev``."""
    from safetensors.torch import save_file
    from transformers import Qwen3MoeConfig

    from moecompress.core.checkpoint import resolve_model

    tok_src = resolve_model(None)
    path.mkdir(parents=True, exist_ok=True)
    cfg = Qwen3MoeConfig(
        vocab_size=8192, num_hidden_layers=layers, max_position_embeddings=4096, tie_word_embeddings=False,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], bos_token_id=0, eos_token_id=0,
        pad_token_id=0, rms_norm_eps=1e-6, **shapes,
    )  # fmt: skip
    cfg_d = cfg.to_dict()
    cfg_d["num_local_experts"] = shapes["num_experts"]  # both count keys (see DESIGN.md, model facts)
    cfg_d["dtype"] = "bfloat16"
    g = torch.Generator(device=dev).manual_seed(seed)
    H, I, E = shapes["hidden_size"], shapes["moe_intermediate_size"], shapes["num_experts"]
    nh, kv, hd = shapes["num_attention_heads"], shapes["num_key_value_heads"], shapes["head_dim"]

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=dev) * 0.02).to(torch.bfloat16).cpu()

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=torch.bfloat16)

    weight_map: dict[str, str] = {}
    head = {"model.embed_tokens.weight": rnd(8192, H), "model.norm.weight": ones(H), "lm_head.weight": rnd(8192, H)}
    save_file(head, str(path / "model-head.safetensors"), metadata={"format": "pt"})
    weight_map.update({k: "model-head.safetensors" for k in head})
    nbytes = sum(t.numel() * 2 for t in head.values())
    for l in range(layers):
        p = f"model.layers.{l}."
        t = {
            p + "input_layernorm.weight": ones(H),
            p + "post_attention_layernorm.weight": ones(H),
            p + "self_attn.q_proj.weight": rnd(nh * hd, H),
            p + "self_attn.k_proj.weight": rnd(kv * hd, H),
            p + "self_attn.v_proj.weight": rnd(kv * hd, H),
            p + "self_attn.o_proj.weight": rnd(H, nh * hd),
            p + "self_attn.q_norm.weight": ones(hd),
            p + "self_attn.k_norm.weight": ones(hd),
            p + "mlp.gate.weight": rnd(E, H),
        }
        for e in range(E):
            q = f"{p}mlp.experts.{e}."
            t[q + "gate_proj.weight"] = rnd(I, H)
            t[q + "up_proj.weight"] = rnd(I, H)
            t[q + "down_proj.weight"] = rnd(H, I)
        name = f"model-layer{l:02d}.safetensors"
        save_file(t, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in t})
        nbytes += sum(x.numel() * 2 for x in t.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": nbytes}, "weight_map": weight_map}, indent=1)
    )
    (path / "config.json").write_text(json.dumps(cfg_d, indent=1))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_src / f, path / f)
    return {"bytes": nbytes, "layers": layers, "shapes": shapes, "vocab": 8192}


# ---- part 5: tokens/s of packed experts vs dense bf16 --------------------------------------------------------------
def tokens_per_s(model: torch.nn.Module, dev: str, batch: int, iters: int, vocab: int) -> float:
    ids = torch.randint(0, vocab, (batch, 1), generator=torch.Generator().manual_seed(batch)).to(dev)
    times = []
    with torch.no_grad():
        for i in range(iters + 1):
            _, rec = timed(dev, lambda: model(input_ids=ids, use_cache=False))
            if i:  # the first forward warms up (Triton compilation, cuBLAS handles)
                times.append(rec.get("cuda_event_s", rec["wall_s"]))
    return batch / statistics.median(times)


def throughput(big: Path, q4: Path, dev: str, iters: int, batches: list[int]) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from moecompress.quant import triton_pack
    from moecompress.quant.load import load_quantized
    from moecompress.quant.packed_experts import module_nbytes, set_kernel

    res: dict[str, Any] = {"forward": "one token per sequence, no KV cache; median of iters after one warm-up"}
    vocab = 8192
    probe = torch.randint(0, vocab, (4, 16), generator=torch.Generator().manual_seed(1)).to(dev)
    logits: dict[str, torch.Tensor] = {}
    variants: list[tuple[str, Callable[[], torch.nn.Module], str | None]] = [
        ("dense_bf16_default_kernel", lambda: AutoModelForCausalLM.from_pretrained(big, dtype=torch.bfloat16), None),
        (
            "dense_bf16_eager",
            lambda: AutoModelForCausalLM.from_pretrained(big, dtype=torch.bfloat16, experts_implementation="eager"),
            None,
        ),  # fmt: skip
        ("packed4_triton", lambda: load_quantized(q4, dev, torch.bfloat16, packed=True), "triton"),
        ("packed4_torch", lambda: load_quantized(q4, dev, torch.bfloat16, packed=True), "torch"),
    ]
    for name, load, kernel in variants:
        if kernel == "triton" and not triton_pack.available(torch.empty(0, device=dev)):
            res[name] = {"ok": False, "skipped": "Triton kernel not available on this device"}
            continue
        try:
            m = load().to(dev).eval()
            if kernel:
                set_kernel(m, kernel)
            r: dict[str, Any] = {"ok": True, "resident_bytes": module_nbytes(m)}
            with torch.no_grad():
                logits[name] = m(input_ids=probe, use_cache=False).logits.float().cpu()
            for b in batches:
                r[f"tokens_per_s_b{b}"] = round(tokens_per_s(m, dev, b, iters, vocab), 1)
            if dev == "cuda":
                r["peak_cuda_bytes"] = int(torch.cuda.max_memory_allocated())
            res[name] = r
            del m
        except Exception as err:
            res[name] = error_record(err)
        if dev == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    if "packed4_triton" in logits and "packed4_torch" in logits:  # same weights: only summation order differs
        a, t = logits["packed4_triton"], logits["packed4_torch"]
        res["packed_triton_vs_torch_logits_rel_max_abs"] = float((a - t).abs().max() / t.abs().max())
    for b in batches:
        d, p = res.get("dense_bf16_default_kernel", {}), res.get("packed4_triton", {})
        if d.get("ok") and p.get("ok"):
            res[f"packed_triton_over_dense_b{b}"] = round(p[f"tokens_per_s_b{b}"] / d[f"tokens_per_s_b{b}"], 3)
    return res


def environment(dev: str) -> dict[str, Any]:
    import transformers

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "host": f"{platform.machine()}, {os.cpu_count()} cpus",
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if dev == "cuda":
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, gpu_memory_bytes=p.total_memory, cuda=torch.version.cuda)
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (the CPU smoke run of the test suite)")
    ap.add_argument("--model", default="builtin", help="model for parts 1-3 (default: the built-in model)")
    ap.add_argument("--budget-s", type=float, default=270.0, help="time budget; later parts are skipped past it")
    ap.add_argument("--big-layers", type=int, default=None, help="layers of the synthetic checkpoint (default 2)")
    ap.add_argument("--iters", type=int, default=None, help="timed forwards per throughput point")
    ap.add_argument("--out", default=str(ROOT / "reports" / "gpu_check.json"))
    ap.add_argument("--parts", default="builtin,kernel,big,bigops,throughput", help="comma list of the parts to run")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed at the end)")
    args = ap.parse_args(argv)
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    quick = args.quick
    size = (
        dict(samples=4, seq_len=32, eval_windows=1, est_s=5)
        if quick
        else dict(samples=16, seq_len=256, eval_windows=4, est_s=20)
    )
    big_layers = args.big_layers or 2
    iters = args.iters or (2 if quick else 10)
    parts = set(args.parts.split(","))
    if parts - set(PARTS):
        ap.error(f"--parts: unknown {sorted(parts - set(PARTS))}; choose from {','.join(PARTS)}")
    budget = Budget(args.budget_s)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    res: dict[str, Any] = {
        "command": " ".join(["python3", "bench/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
        "device": dev,
        "reference": "cpu",
        "quick": quick,
        "budget_s": args.budget_s,
        "budget_exhausted": False,
        "sizes": size,
        "tolerances": TOL,
        "env": environment(dev),
        "builtin": {dev: {}},
        "compare": {},
    }
    run = Runner(budget, res, Path(args.out))
    print(json.dumps(res["env"]), flush=True)
    try:
        # 1. the pipeline on the device (its CPU reference runs last: the GPU-only parts must not wait for it)
        if "builtin" in parts:
            pipeline(run, args.model, dev, work, size, res["builtin"][dev])
        # 3. the kernel on the 4-bit model
        if "kernel" in parts:
            res["kernel"] = {"quantize_gptq4": res["builtin"][dev].get("quantize_gptq4", {})}
            run.op(res["kernel"], "q4_logits", dev, lambda: kernel_check(work / dev / "q4", dev, size["seq_len"]),
                   size["est_s"], needs=["quantize_gptq4"])  # fmt: skip
            del res["kernel"]["quantize_gptq4"]
        # 4. the synthetic big checkpoint, 5. tokens/s
        shapes = TINY_BIG if quick else QWEN3_30B
        bdir = work / "big"
        est_big = 5 if quick else 15 * big_layers
        if parts & {"big", "bigops", "throughput"}:
            big = res["big"] = {}
            run.op(big, "make", dev, lambda: make_big(bdir / "base", big_layers, shapes, dev), est_big / 2)
            bcal = ["--samples", "4" if quick else "8", "--seq-len", "32" if quick else "256", "--batch-size", "4"]
            base = str(bdir / "base")
            if parts & {"big", "bigops"}:
                prof = ["profile", base, "-o", str(bdir / "profile"), *bcal]
                run.cmd(big, "profile", dev, prof, est_big, needs=["make"])
            q4 = ["quantize", base, "--bits", "4", "--plan", "uniform", "--method", "gptq", "-o", str(bdir / "q4")]
            run.cmd(big, "quantize_gptq4", dev, [*q4, *bcal], est_big, needs=["make"])
            if "bigops" in parts:  # the other heavy ops on the big slice, the GPU's own figures (no CPU reference)
                bprof = ["--profile", str(bdir / "profile")]
                outerr = ["prune", base, "--ratio", "0.5", *bprof, "-o", str(bdir / "pruned"), *bcal]
                run.cmd(big, "prune_output_error", dev, outerr, est_big, needs=["profile"])
                aratio = "0.5" if quick else "0.25"  # the quick slice's width 32 has two blocks of 16 channels
                atom = ["prune", base, "--granularity", "atom", "--ratio", aratio, "-o", str(bdir / "atom"), *bcal]
                run.cmd(big, "prune_atom_heapr", dev, atom, est_big, needs=["make"])
                merge = ["merge", base, "--ratio", "0.5", *bprof, "-o", str(bdir / "merged"), *bcal]
                run.cmd(big, "merge", dev, merge, 2 * est_big, needs=["profile"])
        if "throughput" in parts:
            res["throughput"] = {"quantize_gptq4": res["big"].get("quantize_gptq4", {})}
            run.op(res["throughput"], "big_q4", dev,
                   lambda: throughput(bdir / "base", bdir / "q4", dev, iters, [1, 64]), est_big,
                   needs=["quantize_gptq4"])  # fmt: skip
            del res["throughput"]["quantize_gptq4"]
        # 1b. the same pipeline on the CPU, 2. compare. With --device cpu the device run is its own reference
        # (the comparison code still runs, on identical folders)
        if "builtin" in parts:
            if dev == "cpu":
                sec_ref = res["builtin"][dev]
                res["reference"] = "the device run itself (--device cpu)"
            else:
                sec_ref = res["builtin"].setdefault("cpu", {})
                pipeline(run, args.model, "cpu", work, size, sec_ref)
            compare_all(run, work, dev, "cpu", res["builtin"][dev], sec_ref, res["compare"])
            checks = [v for v in res["compare"].values() if "skipped" not in v]
            res["compare_all_ok"] = bool(checks) and all(v.get("ok") for v in checks)
    finally:
        from moecompress.quant import packed_experts

        res["triton_auto_fallbacks"] = list(packed_experts._TRITON_FAILED)  # the "auto" kernel failed (reported)
        run.save()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(f"gpu_check: wrote {args.out} ({res['elapsed_s']} s; budget exhausted: {res['budget_exhausted']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
