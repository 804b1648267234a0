"""`moecompress compress --budget-gb X`: one plan of expert removal, channel widths and bit widths for a byte budget.

    budget_compress(model, output, budget_gb=None, budget_ratio=0.3, servable=False, other_bits=8)

1. ``Job.prepare`` and the profile (``--profile`` or one profiling pass): super experts are never removed;
2. the measuring pass (budget/measure.py): every option's block-output error and the KL probes;
3. the plan (budget/plan.py + budget/solve.py): the integer program over every routed expert's options under the
   byte budget (exact layout), or the best expert count and width for the model with bits per layer (``servable``);
4. the write pass: prune -> atom -> quantize transforms with the plan's explicit choices, one engine pass, one
   checkpoint with moecompress.json (one section per stage plus the "budget" section) and plan.json; with ``check``
   (default) a joint plan that differs from the quantize-only plan (quantize's LP plan at the same budget, written as
   `quantize --plan lp` writes it: ``--granularity expert`` for exact layouts, ``--granularity layer`` for
   servable ones) must also beat it in KL on held-out calibration windows (budget/check.py: one more pass, a third
   when the quantize-only plan wins and is written instead).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..compress.run import _profile, keep_profile, new_manifest
from ..core.errors import UserError
from ..core.job import Job
from ..core.manifest import Manifest
from ..core.output import Output
from ..prune.order import RouterSpec
from ..prune.transform import protected_experts
from .check import FinalStates, calibration_kl, engine_for, judge_windows
from .execute import LAYOUT, servable_bits, transforms_for
from .measure import BudgetMeasure
from .options import FRACTIONS, PAIRS
from .plan import Structure, bf16_bytes, make_plan

OTHER_BITS = (4, 8, 16)


def budget_bytes_for(ckpt: Any, budget_gb: float | None, budget_ratio: float | None) -> tuple[float, str]:
    """The byte budget and how it was given (one of the two)."""
    if (budget_gb is None) == (budget_ratio is None):
        raise UserError("give exactly one of --budget-gb G or --budget-ratio R")
    if budget_gb is not None:
        if not budget_gb > 0:
            raise UserError(f"--budget-gb {budget_gb:g} must be positive")
        return budget_gb * 1e9, f"--budget-gb {budget_gb:g}"
    assert budget_ratio is not None
    if not 0 < budget_ratio < 1:
        raise UserError(f"--budget-ratio {budget_ratio:g} must be between 0 and 1 (a fraction of the bf16 size)")
    ref = bf16_bytes(ckpt)
    return budget_ratio * ref, f"--budget-ratio {budget_ratio:g} of the bf16 size ({ref:,} bytes)"


def measure_budget(job: Job, prof: Any, probes: bool = True, check: bool = True) -> tuple[BudgetMeasure, dict]:
    """The measuring pass: every option's error and the KL probes (reusable for several budgets). With ``check``
    the judge windows of the quantize-only guard (budget/check.py) ride along, unseen by the measurement."""
    ckpt = job.ckpt
    spec = RouterSpec.from_config(ckpt.family, ckpt.config)
    measure = BudgetMeasure(spec, protected=protected_experts(prof, list(ckpt.moe_layers)), probes=probes)
    hidden = int(ckpt.tensor_info()[ckpt.family.expert_key(ckpt.moe_layers[0], 0, 0)]["shape"][1])
    measure.judge = judge_windows(job.tokens(), ckpt.path, hidden=hidden) if check else None
    engine = engine_for(job, "budget: measure", measure.judge)
    final = FinalStates(engine, measure.probe_layer)
    engine.run([measure], emit=final)
    measure.final = final.states  # the source's last hidden states of the judge (else calibration) windows
    return measure, measure.probe_kl(engine)


def supers_of(prof: Any) -> list[tuple[int, int]]:
    return [tuple(x) for x in prof.super_experts] if prof is not None else []


def budget_compress(
    model: str | Path | None,
    output: str | Path,
    budget_gb: float | None = None,
    budget_ratio: float | None = None,
    servable: bool = False,
    other_bits: int = 8,
    calib: str | Path = "mixed",
    samples: int = 64,
    seq_len: int = 256,
    seed: int = 0,
    batch_size: int = 8,
    device: torch.device | None = None,
    overwrite: bool = False,
    profile_dir: str | Path | None = None,
    check: bool = True,
) -> Manifest:
    """Plan for the budget and write OUTPUT (HF folder + moecompress.json + plan.json + report.html)."""
    if other_bits not in OTHER_BITS:
        raise UserError(f"--other-bits {other_bits} is not one of {', '.join(map(str, OTHER_BITS))}")
    job = Job.prepare(
        model, output, calib=calib, samples=samples, seq_len=seq_len, seed=seed, batch_size=batch_size,
        device=device, overwrite=overwrite, profile_dir=profile_dir,
    )  # fmt: skip
    ckpt = job.ckpt
    ckpt.check_layout("quantized" if servable else LAYOUT)  # every budget plan writes quantized experts
    ckpt.family.expert_key(ckpt.moe_layers[0], 0, 0)  # fused on disk: quantization's own refusal, before routing's
    ckpt.family.check_routing(
        ckpt.config, "the budget planner", removes_experts=True, needs_routing=True,
        hint="use --recipe with a quantize stage, or moecompress quantize --plan lp --budget-gb",
    )  # fmt: skip
    budget, note = budget_bytes_for(ckpt, budget_gb, budget_ratio)
    Structure(ckpt, servable, other_bits, [], FRACTIONS, PAIRS).check_reachable(budget, note)  # before any pass
    prof, made = _profile(job, [])  # no merge stage: its own profile skips output similarity
    supers = supers_of(prof)
    Structure(ckpt, servable, other_bits, supers, FRACTIONS, PAIRS).check_reachable(budget, note)  # supers kept
    measure, kl = measure_budget(job, prof, check=check)
    return plan_and_write(job, prof, made, measure, kl, budget, servable, other_bits, note, profile_dir, check)


def plan_and_write(
    job: Job, prof: Any, made: bool, measure: BudgetMeasure, kl: dict, budget: float, servable: bool,
    other_bits: int, note: str, profile_dir: str | Path | None = None, check: bool = True,
) -> Manifest:  # fmt: skip
    """Plan for ``budget`` and write it; with ``check`` (budget/check.py) a joint plan that differs from the
    quantize-only plan is written only if its KL on held-out calibration windows is lower, else the quantize-only
    plan (also when the two choose alike: then it is written as quantize writes it)."""
    ckpt, supers = job.ckpt, supers_of(prof)
    plan = make_plan(ckpt, measure, kl, budget, servable, other_bits, supers, note)
    alt = None
    if check and measure.final is not None:
        try:
            alt = make_plan(ckpt, measure, kl, budget, servable, other_bits, supers, note, bits_only=True)
        except UserError:  # only removals or cuts reach this budget
            alt = None
    if alt is None or _choices(alt) == _choices(plan):
        if alt is not None:
            plan = alt
        plan["check"] = {"rule": "not needed: the quantize-only plan does not fit or is this plan" if check else "off"}
        return write_plan(job, prof, made, plan, measure, other_bits, profile_dir)
    engine = engine_for(job, "budget: check the quantize-only plan", measure.judge)
    final = FinalStates(engine)
    engine.run(transforms_for(alt, measure.spec, ckpt.num_experts, measure.keep, other_bits,
                              protected_experts(prof, list(ckpt.moe_layers)),
                              propagate=alt["propagate_quantized"]), emit=final)  # fmt: skip
    assert final.states is not None
    kl_alt = calibration_kl(measure.final, final.states, engine)
    judged = "held-out calibration windows" if measure.judge is not None else "the fitting calibration windows"
    facts = {"rule": f"KL on {judged} of the joint plan vs the quantize-only plan; the lower is written",
             "judge_windows": 0 if measure.judge is None else int(measure.judge.shape[0]),
             "joint_kl": None, "bits_only_kl": kl_alt, "bits_only_predicted_cost": alt["predicted_cost"],
             "joint_predicted_cost": plan["predicted_cost"]}  # fmt: skip
    plan["check"] = {**facts, "chosen": "joint"}
    man, kl_plan = write_plan(job, prof, made, plan, measure, other_bits, profile_dir, measure_kl=True)
    if kl_plan is None or kl_plan <= kl_alt:
        return man
    alt["check"] = {**facts, "joint_kl": kl_plan, "chosen": "bits_only"}
    man = write_plan(job, prof, made, alt, measure, other_bits, profile_dir, overwrite=True)
    return man


def _choices(plan: dict[str, Any]) -> list[str]:
    return [r["choice"] for v in plan["layers"].values() for r in v["experts"]]


def write_plan(
    job: Job, prof: Any, made: bool, plan: dict[str, Any], measure: BudgetMeasure, other_bits: int,
    profile_dir: str | Path | None = None, measure_kl: bool = False, overwrite: bool = False,
    propagate: bool | None = None,
) -> Any:  # fmt: skip
    """The write pass of ``plan`` (make_plan's dict) into ``job.out``: one checkpoint, plan.json, manifest, report.
    Returns the manifest; with ``measure_kl`` ``(manifest, KL on the judge windows)`` (budget/check.py), the
    KL recorded in plan.json's "check" as ``joint_kl``. ``overwrite``: replace this call's own earlier output.
    ``propagate`` (default: the plan's "propagate_quantized"): later layers calibrated on the quantized layers."""
    ckpt, servable = job.ckpt, plan["layout"] == "servable"
    spec = RouterSpec.from_config(ckpt.family, ckpt.config)
    protected = protected_experts(prof, list(ckpt.moe_layers))
    if propagate is None:
        propagate = plan.get("propagate_quantized", False)
    plan["propagate_quantized"] = propagate
    transforms = transforms_for(plan, spec, ckpt.num_experts, measure.keep, other_bits, protected,
                                propagate=propagate)  # fmt: skip
    cfg = json.loads((ckpt.path / "config.json").read_text())
    manifest, profile_ref = new_manifest(job, "compress --budget", profile_dir)
    assert job.out is not None
    with Output(job.out, job.overwrite or overwrite) as out:
        out.add_globals(ckpt, transforms)
        engine = engine_for(job, "budget: write", measure.judge if measure_kl else None)
        final = FinalStates(engine, out.add_layer) if measure_kl and measure.final is not None else None
        engine.run(transforms, emit=final or out.add_layer)
        kl = None
        if final is not None and final.states is not None:
            kl = calibration_kl(measure.final, final.states, engine)
            plan.setdefault("check", {})["joint_kl"] = kl
        summary = {k: v for k, v in plan.items() if k not in ("layers", "sensitivity", "probe_kl")}
        summary["layers"] = {
            l: {k: v[k] for k in ("kept_experts", "widths", "bits")} for l, v in plan["layers"].items()
        }
        manifest.add("budget", {**summary, "plan_file": "plan.json", "profile": profile_ref})
        for t in transforms:
            t.config(cfg)
            section = manifest.add(t.name, {**t.section(), "profile": profile_ref})
            manifest.warnings += [str(w) for w in section.pop("warnings", []) or []]
        if servable:  # one bit width for the model: transformers; per layer: vLLM and moecompress.load
            one = isinstance(servable_bits(plan), int)
            manifest.layout, manifest.load_with = "quantized", "transformers" if one else "moecompress.load"
            if not one:
                manifest.warnings.append("bit widths per layer (one scheme per layer, vLLM serves them): "
                                         "transformers 5.23 loads them wrongly: moecompress.load")  # fmt: skip
        else:
            manifest.layout, manifest.load_with = LAYOUT, "moecompress.load"
        reuse = keep_profile(out, prof, made, profile_dir)
        assert out.shards is not None
        written = int(out.shards.total)
        plan["written_tensor_bytes"] = written
        manifest.stage("budget")["written_tensor_bytes"] = written  # type: ignore[index]
        out.finish(ckpt, cfg, manifest, extra_json={"plan.json": plan}, report_inputs=reuse, elapsed=job.elapsed)
    return (manifest, kl) if measure_kl else manifest
