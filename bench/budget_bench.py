"""The byte-budget planner (`compress --budget-*`) against single methods and hand-made two-step chains.

At 25%, 35% and 50% of a model's bf16 tensor bytes: KL(base || output) on held-out windows of the joint plan (exact
layout and --servable) vs the best single method whose output fits (quantize uniform 2/3/4 bits, quantize's LP plans
at that budget per expert and projection and per layer (the two guard alternatives), expert pruning, channel
pruning; all at --other-bits 8 where they quantize) and the best two-step chain that fits (prune or merge, then
quantize, in one `compress` pass). Every run uses the same calibration windows (mixed, --samples, --seq-len, seed
0). Bytes are the safetensors tensor payload (what the planner budgets). Also: the Spearman rank correlation between
the planner's predicted cost and the measured KL over all its plans (extra budgets included), and the solve time of
a synthetic Qwen3-30B-sized instance (48 layers x 128 experts x 49 options: removal, or 3 widths x quantize's 16
(gate/up, down) bit pairs) on one core.

    OMP_NUM_THREADS=1 .venv/bin/python bench/budget_bench.py                      # the built-in model
    OMP_NUM_THREADS=1 .venv/bin/python bench/budget_bench.py --model /work/shared/validation/stories260k-moe \\
        --out reports/budget_bench.stories260k

Writes PREFIX.json, PREFIX.md and PREFIX.svg (Pareto plot, bytes vs KL).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RATIOS = (0.25, 0.35, 0.5)
EXTRA = (0.3, 0.42, 0.6)  # more plans for the predicted-vs-measured correlation
CACHED = "; the measuring pass ran first (`--measure-only --measure-cache F`), the run read it"


def payload(folder: Path) -> int:
    """Tensor bytes of every safetensors file (headers excluded)."""
    total = 0
    for f in folder.glob("*.safetensors"):
        with open(f, "rb") as h:
            n = int.from_bytes(h.read(8), "little")
            head = json.loads(h.read(n))
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in head.items() if k != "__metadata__")
    return total


def spearman(a: list[float], b: list[float]) -> float | None:
    if len(a) < 3:
        return None
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def synthetic_ip(seed: int = 0) -> dict[str, Any]:
    """A Qwen3-30B-A3B-sized instance (48 x 128 experts, H 2048, I 768, the planner's menu: removal or 3 widths x 16
    (gate/up, down) bit pairs) at 30% of the expert bytes. Costs: gate/up and down_proj errors falling 4x per bit,
    a cut's error growing with the channels removed, each option and expert with its own noise."""
    from moecompress.budget.options import menu, option_bytes
    from moecompress.budget.solve import Shape, servable_plan, solve

    L, E = 48, 128
    opts = menu(768)
    rng = np.random.default_rng(seed)
    per = np.array([option_bytes(o, 2048, 2, 2048 * 2) for o in opts], dtype=float)
    nbytes = np.tile(per, (L * E, 1))
    scale = rng.lognormal(0, 1, (L * E, 1))  # expert importance
    base = np.array([0 if o.removed else 25 * 2.0 ** (-2 * o.pair[0]) + 25 * 2.0 ** (-2 * o.pair[1])
                     + 3 * (1 - o.fraction) for o in opts])  # fmt: skip
    costs = scale * base * (1 + rng.uniform(0, 0.3, (L * E, len(opts))))
    costs[:, 0] = scale[:, 0] * rng.uniform(5, 20, L * E)
    shape = Shape(np.repeat(np.arange(L), E), np.zeros(L * E, int), 8)
    t, c = time.perf_counter(), time.process_time()
    sol = solve(costs, nbytes, 0.3 * per.max() * L * E, shape)
    out = {"items": L * E, "options": len(opts), "solver": sol.solver, "solve_s": round(sol.solve_s, 2),
           "total_s": round(time.perf_counter() - t, 2), "total_cpu_s": round(time.process_time() - c, 2),
           **sol.info}  # fmt: skip
    kept = [j for j, o in enumerate(opts) if not o.removed and o.uniform]  # --servable: one count and width, bits
    t, c = time.perf_counter(), time.process_time()  # per layer
    srv = servable_plan(costs.reshape(L, E, -1), nbytes.reshape(L, E, -1), 0.3 * per.max() * L * E, shape,
                        kept_options=kept, width_of={j: opts[j].width for j in kept})  # fmt: skip
    out["servable"] = {"total_s": round(time.perf_counter() - t, 2), "total_cpu_s": round(time.process_time() - c, 2),
                       "knapsacks_solved": srv.info["knapsacks_solved"]}  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: the built-in model)")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--out", default=str(ROOT / "reports" / "budget_bench"))
    ap.add_argument("--skip-ip", action="store_true", help="skip the synthetic solve-time instance")
    ap.add_argument("--ratios", default=",".join(map(str, RATIOS)), help="budgets compared, fractions of bf16")
    ap.add_argument("--extra", default=",".join(map(str, EXTRA)), help="more budgets (exact plans) for the correlation")
    ap.add_argument(
        "--part",
        choices=("all", "joint", "single", "chain"),
        default="all",
        help="run only one group (writes PREFIX.PART.json; run the groups in parallel, then --combine)",
    )
    ap.add_argument("--propagate-row", type=int, default=1, help="0: skip the propagating write of the joint part")
    ap.add_argument(
        "--rerun",
        default=None,
        help="with --combine: PREFIX2 of a partial rerun whose runs replace "
        "PREFIX's of the same name (joint part: every joint run at a budget it reran)",
    )
    ap.add_argument("--rerun-note", default="rerun", help="what the rerun changed (shown beside its runs)")
    ap.add_argument("--combine", action="store_true", help="combine PREFIX.{joint,single,chain}.json into PREFIX.*")
    ap.add_argument(
        "--measure-cache",
        default=None,
        help="joint part: the planner's measuring pass (profile, errors, probes, judge windows) saved to this file "
        "(torch.save) when it is absent, read from it when present (the planning and writing code can change after "
        "the measuring pass ran; its time is the pass's own)",
    )
    ap.add_argument("--measure-only", action="store_true", help="with --measure-cache: stop after saving it")
    ap.add_argument("--render", action="store_true", help="rewrite PREFIX.md and PREFIX.svg from PREFIX.json")
    args = ap.parse_args()
    ratios = tuple(float(x) for x in args.ratios.split(","))
    extra = tuple(float(x) for x in args.extra.split(",") if x)

    from moecompress.budget.plan import bf16_bytes
    from moecompress.core.checkpoint import Checkpoint, resolve_model
    from moecompress.core.evaluate import evaluate

    model = resolve_model(args.model)
    ckpt = Checkpoint(model)
    ref = bf16_bytes(ckpt)
    cal = {"calib": "mixed", "samples": args.samples, "seq_len": args.seq_len, "seed": 0}
    tmp = Path(tempfile.mkdtemp(prefix="budget_bench_"))
    runs: list[dict[str, Any]] = []

    def record(kind: str, name: str, out: Path, t0: float, **extra: Any) -> None:
        ev = evaluate(out, base=model, data="mixed", seq_len=args.seq_len, max_windows=args.eval_windows)
        row = {"kind": kind, "name": name, "bytes": payload(out), "kl": ev["kl_to_base"],
               "top1": ev["top1_agreement"], "wall_s": round(time.time() - t0, 1), **extra}  # fmt: skip
        row["ratio"] = row["bytes"] / ref
        runs.append(row)
        print(f"{kind:8s} {name:28s} {row['bytes']:>12,} ({row['ratio']:.1%}) KL {row['kl']:.5f}", flush=True)
        shutil.rmtree(out, ignore_errors=True)
        save()

    def save() -> None:  # each part's runs so far (a long bench can be combined from what finished)
        if args.part != "all":
            Path(f"{args.out}.{args.part}.json").write_text(json.dumps({"runs": runs, "measure_s": state.get("m")}))

    state: dict[str, Any] = {}

    if args.render:
        res = json.loads(Path(f"{args.out}.json").read_text())
        Path(f"{args.out}.md").write_text(markdown(res, args))
        Path(f"{args.out}.svg").write_text(plot(res["runs"], res["bf16_bytes"]))
        return
    if args.combine:
        runs, measure_s = [], None
        for part in ("joint", "single", "chain"):
            if not Path(f"{args.out}.{part}.json").exists():
                continue
            d = json.loads(Path(f"{args.out}.{part}.json").read_text())
            if args.rerun and Path(f"{args.rerun}.{part}.json").exists():
                d = rerun(d, json.loads(Path(f"{args.rerun}.{part}.json").read_text()), args.rerun_note)
                Path(f"{args.out}.{part}.json").write_text(json.dumps(d))
            runs += d["runs"]
            measure_s = d.get("measure_s") or measure_s
        return finish(args, model, ref, cal, runs, measure_s, ratios)
    measure_s = None
    part_file = Path(f"{args.out}.{args.part}.json")
    if args.part in ("single", "chain") and part_file.exists():  # resume: keep the runs a stopped part finished
        runs += [r for r in json.loads(part_file.read_text())["runs"] if "failed" not in r]
    if args.part in ("all", "joint"):
        measure_s = state["m"] = joint(args, model, ckpt, ref, cal, ratios, extra, tmp, runs, record, state)
    if args.part in ("all", "single"):
        single(args, model, ckpt, ref, cal, ratios, tmp, runs, record)
    if args.part in ("all", "chain"):
        chain(model, ckpt, cal, tmp, runs, record)
    shutil.rmtree(tmp, ignore_errors=True)
    if args.part != "all":
        save()
        return
    finish(args, model, ref, cal, runs, measure_s, ratios)


def rerun(old: dict, new: dict, note: str) -> dict:
    """``old`` part results with ``new``'s runs in place of those of the same name (and of every checked joint run
    and unchecked or propagating variant at a budget the new joint runs cover); new runs carry ``note``."""
    names = {r["name"] for r in new["runs"]}
    targets = {r.get("target") for r in new["runs"] if r["kind"] == "joint"}
    kept = [r for r in old["runs"] if r["name"] not in names
            and not (r["kind"] in ("joint", "variant") and r.get("target") in targets)]  # fmt: skip
    measure_s = new.get("measure_s") or old.get("measure_s")
    return {"runs": kept + [{**r, "rerun": note} for r in new["runs"]], "measure_s": measure_s}


def joint(args, model, ckpt, ref, cal, ratios, extra, tmp, runs, record, state) -> float:
    """The joint plan: one profile + one measuring pass, then per budget the checked plan (budget/check.py: written
    only if it beats the quantize-only plan on the calibration windows); where the check chose the quantize-only
    plan, the unchecked joint plan too, and the 35% (or first) exact plan written propagating quantized layer
    outputs (the write pass's other calibration: later layers' GPTQ on the quantized layers' outputs)."""
    import torch

    from moecompress.budget.plan import make_plan
    from moecompress.budget.run import measure_budget, plan_and_write, supers_of, write_plan
    from moecompress.compress.run import _profile
    from moecompress.core.errors import UserError
    from moecompress.core.job import Job

    t0 = time.time()
    job = Job.prepare(model, None, batch_size=8, **cal)
    cache = Path(args.measure_cache) if args.measure_cache else None
    if cache is not None and cache.exists():
        prof, measure, kl, measure_s = torch.load(cache, weights_only=False)
        print(f"profile + measuring pass read from {cache} (it took {measure_s} s)", flush=True)
    else:
        prof, _ = _profile(job)
        measure, kl = measure_budget(job, prof)
        measure_s = round(time.time() - t0, 1)
        if cache is not None:
            torch.save((prof, measure, kl, measure_s), cache)
    state["m"] = measure_s
    print(f"profile + measuring pass: {measure_s} s", flush=True)
    if args.measure_only:
        return measure_s
    order = [(r, False) for r in ratios] + [(r, True) for r in ratios] + [(r, False) for r in extra]
    switched = []
    for ratio, servable in order:
        name = f"joint {'servable' if servable else 'exact'} {ratio:.0%}"
        t1 = time.time()
        out = tmp / "joint"
        w = Job.prepare(model, out, batch_size=8, tokens=job.tokens(), **cal)
        try:
            plan_and_write(w, prof, False, measure, kl, ratio * ref, servable, 8, f"{ratio:.0%}")
        except UserError as err:
            runs.append({"kind": "joint", "name": name, "target": ratio, "unreachable": str(err)})
            print(f"joint    {name:28s} unreachable", flush=True)
            continue
        plan = json.loads((out / "plan.json").read_text())
        if (plan.get("check") or {}).get("chosen") == "bits_only":
            switched.append((ratio, servable))
        record("joint", name, out, t1, target=ratio, predicted=plan["predicted_cost"], counts=plan["counts"],
               solve_s=plan["solver"]["solve_s"], layout=plan["layout"], check=plan.get("check"),
               protect_note=plan.get("protect_note"), protected_few_token=len(plan.get("protected_few_token") or []),
               restriction=plan.get("restriction"))  # fmt: skip
    exact = [r for r in ratios if any(x.get("name") == f"joint exact {r:.0%}" and "kl" in x for x in runs)]
    extra_rows = [(r, s, False) for r, s in switched]
    if exact and args.propagate_row:
        extra_rows.append((0.35 if 0.35 in exact else exact[0], False, True))
    for ratio, servable, propagate in extra_rows:  # the unchecked joint plan; the propagating write
        lay = "servable" if servable else "exact"
        name = f"joint {lay} {ratio:.0%} " + ("unchecked, propagate" if propagate else "unchecked")
        plan = make_plan(ckpt, measure, kl, ratio * ref, servable, 8, supers_of(prof), f"{ratio:.0%}")
        t1 = time.time()
        out = tmp / "joint"
        w = Job.prepare(model, out, batch_size=8, tokens=job.tokens(), **cal)
        write_plan(w, prof, False, plan, measure, 8, propagate=propagate)
        record("variant", name, out, t1, target=ratio, predicted=plan["predicted_cost"], counts=plan["counts"],
               layout=plan["layout"])  # fmt: skip
    return measure_s


def single(args, model, ckpt, ref, cal, ratios, tmp, runs, record) -> None:
    """Quantize (uniform 2/3/4 bits, LP at each budget), expert pruning, channel pruning."""
    from moecompress.core.errors import UserError
    from moecompress.quant.plan import OPTIONS  # per-expert LP plans choose per-projection options
    from moecompress.quant.run import measure_model, run_quantize

    done = {r["name"] for r in runs}
    todo = [f"quantize LP {r:.0%}" for r in ratios] + [f"quantize {b} bit" for b in (2, 3, 4)]
    todo += [f"quantize LP layer {r:.0%}" for r in ratios]
    if all(n in done for n in todo):
        return run_stages(model, cal, tmp, runs, record, [s for s in stage_list(ckpt) if s[0] == "single"])
    meas = measure_model(model, samples=args.samples, seq_len=args.seq_len, keep_codes=True, widths=OPTIONS)
    # quantize's LP plan per expert, and per layer (one width per layer: the --servable guard's alternative)
    for granularity, label in (("expert", "quantize LP"), ("layer", "quantize LP layer")):
        for ratio in ratios:
            name = f"{label} {ratio:.0%}"
            if name in done:
                continue
            t1 = time.time()
            out = tmp / "q"
            try:
                run_quantize(model, out, measurement=meas, plan="lp", budget_gb=ratio * ref / 1e9,
                             granularity=granularity, **cal)  # fmt: skip
            except UserError:
                runs.append({"kind": "single", "name": name, "target": ratio, "unreachable": True})
                continue
            record("single", name, out, t1)
    for b in (2, 3, 4):
        if f"quantize {b} bit" in done:
            continue
        t1 = time.time()
        out = tmp / "q"
        run_quantize(model, out, measurement=meas, plan="uniform", bits=b, **cal)
        record("single", f"quantize {b} bit", out, t1)
    run_stages(model, cal, tmp, runs, record, [s for s in stage_list(ckpt) if s[0] == "single"])


def chain(model, ckpt, cal, tmp, runs, record) -> None:
    """Two-step chains: prune or merge, then quantize, in one compress pass."""
    run_stages(model, cal, tmp, runs, record, [s for s in stage_list(ckpt) if s[0] == "chain"])


def stage_list(ckpt) -> list[tuple[str, str, list[dict]]]:
    E = ckpt.num_experts
    top_k = ckpt.family.top_k(ckpt.config)
    ok = lambda r: round(r * E) >= 1 and E - round(r * E) >= top_k  # noqa: E731
    stages: list[tuple[str, str, list[dict]]] = []
    for r in (0.75, 0.5):
        if ok(r):
            stages.append(("single", f"prune {r:.0%}", [{"prune": {"ratio": r}}]))
    stages.insert(1, ("single", "atom 70%", [{"atom": {"ratio": 0.7}}]))
    # most informative first (a long bench is combined from what finished): one chain per budget, then the rest
    for r, b in [(0.75, 2), (0.25, 3), (0.25, 4), ("merge", 2), (0.5, 2), (0.25, 2), ("merge", 3), (0.5, 3)]:
        if r == "merge":
            stages.append(("chain", f"merge 50% + {b} bit", [{"merge": {"ratio": 0.5}}, {"quantize": {"bits": b}}]))
        elif ok(r):
            stages.append(("chain", f"prune {r:.0%} + {b} bit", [{"prune": {"ratio": r}}, {"quantize": {"bits": b}}]))
    for a, b in [(0.25, 3), (0.5, 2), (0.25, 2)]:  # channel pruning, then quantize
        stages.append(("chain", f"atom {a:.0%} + {b} bit", [{"atom": {"ratio": a}}, {"quantize": {"bits": b}}]))
    return stages


def run_stages(model, cal, tmp, runs, record, stages) -> None:
    from moecompress.compress.recipe import parse
    from moecompress.compress.run import compress_model
    from moecompress.core.errors import UserError

    done = {r["name"] for r in runs}
    for kind, name, raw in stages:
        if name in done:
            continue
        t1 = time.time()
        out = tmp / "c"
        try:
            compress_model(model, out, parse(raw), batch_size=8, **cal)
        except UserError as err:
            runs.append({"kind": kind, "name": name, "failed": str(err)})
            print(f"{kind:8s} {name:28s} refused: {err}", flush=True)
            continue
        except Exception as err:  # noqa: BLE001 (another package's error: record it, go on with the others)
            runs.append({"kind": kind, "name": name, "failed": f"{type(err).__name__}: {err}"})
            print(f"{kind:8s} {name:28s} failed: {type(err).__name__}: {err}", flush=True)
            continue
        record(kind, name, out, t1)


METHODS = (
    ("exact", "joint exact", lambda r, x: r["name"] == f"joint exact {x:.0%}"),
    ("servable", "joint servable", lambda r, x: r["name"] == f"joint servable {x:.0%}"),
    ("uniform", "quantize uniform", lambda r, x: r["name"].startswith("quantize ") and r["name"].endswith(" bit")),
    ("lp", "quantize LP", lambda r, x: r["name"] == f"quantize LP {x:.0%}"),
    ("lp_layer", "quantize LP per layer", lambda r, x: r["name"] == f"quantize LP layer {x:.0%}"),
    ("prune", "prune alone", lambda r, x: r["kind"] == "single" and r["name"].startswith("prune ")),
    ("atom", "atom alone", lambda r, x: r["kind"] == "single" and r["name"].startswith("atom ")),
    ("chain", "best prune/merge/atom + quantize", lambda r, x: r["kind"] == "chain"),
)


def finish(args, model, ref, cal, runs, measure_s, ratios) -> None:
    """The table per budget (each method's best run that fits), the correlation, the synthetic solve; PREFIX.json,
    .md, .svg."""
    table = []
    for ratio in ratios:
        cap = ratio * ref
        row: dict[str, Any] = {"target": ratio, "budget_bytes": int(cap)}
        for key, _, match in METHODS:
            tried = [r for r in runs if match(r, ratio)]
            fit = [r for r in tried if "kl" in r and r["bytes"] <= cap]
            none = "unreachable" if tried and all("unreachable" in r for r in tried) else "none fits"
            row[key] = min(fit, key=lambda r: r["kl"]) if fit else (none if tried else "not run")
        others = [row[k]["kl"] for k, _, _ in METHODS[2:] if isinstance(row[k], dict)]
        ex = row["exact"]
        if isinstance(ex, dict) and others:
            best = min(others)
            row["verdict"] = "win" if ex["kl"] < best else ("tie" if ex["kl"] == best else "loss")
            row["exact_vs_best_other"] = ex["kl"] / best - 1
        table.append(row)
    plans = [r for r in runs if "kl" in r and "predicted" in r and "propagate" not in r["name"]]
    rho = spearman([r["predicted"] for r in plans], [r["kl"] for r in plans])
    ip = None if args.skip_ip else synthetic_ip()
    result = {
        "model": str(model), "bf16_bytes": ref, "calibration": cal, "eval_windows": args.eval_windows,
        "measure_s": measure_s, "runs": runs, "table": table, "spearman_predicted_vs_kl": rho,
        "plans_in_correlation": len(plans), "synthetic_ip": ip,
        "run_mode": "parts joint, single and chain run side by side with `--part`, then `--combine`" if args.combine
        else "one process",
        "measure_cache": bool(args.measure_cache),
    }  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(result, indent=1) + "\n")
    Path(f"{out}.md").write_text(markdown(result, args))
    Path(f"{out}.svg").write_text(plot(runs, ref))
    print(Path(f"{out}.md").read_text())


def _cell(r: Any, ref: int) -> str:
    if not isinstance(r, dict):
        return r
    return f"{r['kl']:.5f} ({r['name']}, {r['bytes'] / ref:.1%})"


def markdown(res: dict, args: Any) -> str:
    name = Path(res["model"]).name
    ref = res["bf16_bytes"]
    lines = [
        f"# Byte-budget planner vs single methods and two-step chains: {name}",
        "",
        f"`OMP_NUM_THREADS=1 .venv/bin/python bench/budget_bench.py{' --model ' + args.model if args.model else ''}"
        f" --samples {res['calibration']['samples']} --eval-windows {res['eval_windows']}"
        f"{'' if args.ratios == ','.join(map(str, RATIOS)) else ' --ratios ' + args.ratios}` ("
        f"{res.get('run_mode', 'parts joint, single and chain run side by side with `--part`, then `--combine`')}"
        f"{CACHED if res.get('measure_cache') else ''}"
        f"); calibration {res['calibration']['samples']} x "
        f"{res['calibration']['seq_len']} tokens (mixed, seed 0) for every run; KL(source || output) on "
        f"{res['eval_windows']} held-out windows per domain; bytes = safetensors tensor payload; bf16 size {ref:,} B. "
        f"Profile + measuring pass of the planner: {res['measure_s']} s (once for all its budgets). Each cell: the "
        "lowest KL of that method's runs that fit the budget (run, size as a fraction of bf16).",
        "",
        "| budget | " + " | ".join(t for _, t, _ in METHODS) + " | joint exact vs best other |",
        "|---" * (len(METHODS) + 2) + "|",
    ]
    for row in res["table"]:
        cells = [_cell(row[k], ref) for k, _, _ in METHODS]
        v = f"{row['verdict']} ({row['exact_vs_best_other']:+.1%})" if "verdict" in row else "–"
        lines.append(f"| {row['target']:.0%} | " + " | ".join(cells) + f" | {v} |")
    notes = sorted({r["rerun"] for r in res["runs"] if r.get("rerun")})
    if notes:
        lines += ["", f"Runs marked ({', '.join(notes)}) come from a later partial rerun, same settings "
                  "(`--part joint|single --ratios ...`, then `--combine --rerun`); they replace the earlier runs of "
                  "the same name (joint: of the same budget); the measuring-pass time is the rerun's."]  # fmt: skip
    earlier = [r for r in res["runs"] if r.get("earlier")]
    if earlier:
        lines += ["", f"Runs marked (earlier) come from the previous run of this bench, same settings and code of "
                  f"their method ({earlier[0]['earlier']}): {len(earlier)} chain runs; this run's chain part was "
                  "stopped for CPU time after the runs it finished, each of which reproduced its earlier KL to "
                  "every printed digit."]  # fmt: skip
    rho = res["spearman_predicted_vs_kl"]
    lines += [
        "",
        f"Spearman rank correlation of the planner's predicted cost with the measured KL over its "
        f"{res['plans_in_correlation']} plans (checked and unchecked, exact and servable): "
        f"{'n/a' if rho is None else f'{rho:.3f}'}.",
    ]
    checks = [r for r in res["runs"] if r.get("check") and "chosen" in r["check"]]
    if checks:
        lines += ["", "Quantize-only guard (budget/check.py: KL on held-out calibration windows of the joint plan "
                  "and of quantize's LP plan at the same budget, per expert (exact) or per layer (servable)):",
                  ""]  # fmt: skip
        for r in checks:
            c = r["check"]
            on = f"{c['judge_windows']} held-out windows" if c.get("judge_windows") else "the fitting windows"
            lines.append(f"- {r['name']}: joint {c['joint_kl']:.3g} vs quantize-only {c['bits_only_kl']:.3g} on {on} "
                         f"-> {c['chosen']} written")  # fmt: skip
    if res["synthetic_ip"]:
        ip = res["synthetic_ip"]
        lines.append(
            f"\nSynthetic Qwen3-30B-sized instance ({ip['items']:,} experts x {ip['options']} options, "
            f"{ip['binaries']:,} binaries after Pareto pruning): {ip['solver']} solve {ip['solve_s']} s, build "
            f"{ip['build_s']} s, total {ip['total_s']} s wall, {ip['total_cpu_s']} s CPU (one thread; the machine "
            f"was shared, so wall time includes waiting for a core)."
        )
        if ip.get("servable"):
            sv = ip["servable"]
            lines.append(
                f"The same instance with `--servable` (one expert count and width for the model, bits per layer): "
                f"{sv['total_cpu_s']} s CPU, {sv['total_s']} s wall ({sv['knapsacks_solved']} knapsacks over the "
                "layers solved)."
            )
    lines += [
        "",
        f"![bytes vs KL]({Path(args.out).name}.svg)",
        "",
        "All runs:",
        "",
        "| kind | run | bytes | of bf16 | KL | top-1 | predicted | wall s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["runs"]:
        if "kl" in r:
            pred = f"{r['predicted']:.5f}" if "predicted" in r else "–"
            name = (
                r["name"] + (f" ({r['rerun']})" if r.get("rerun") else "") + (" (earlier)" if r.get("earlier") else "")
            )
            lines.append(f"| {r['kind']} | {name} | {r['bytes']:,} | {r['ratio']:.1%} | {r['kl']:.5f} | "
                         f"{r['top1']:.4f} | {pred} | {r['wall_s']} |")  # fmt: skip
        else:
            why = "unreachable" if "unreachable" in r else f"failed: {r.get('failed', '')[:80]}"
            lines.append(f"| {r['kind']} | {r['name']} | – | – | {why} | – | – | – |")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], ref: int) -> str:
    from moecompress.report.svg import pareto_scatter

    pts = [(r["bytes"] / 1e6, r["kl"], r["name"]) for r in runs if "kl" in r]
    return pareto_scatter(pts, x_name="MB (tensor payload)", y_name="KL to the source model", chart_id="budget")


if __name__ == "__main__":
    main()
