"""`moecompress prune` (whole experts): the job, the passes of ``PruneTransform`` on the engine, the output."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..core.checkpoint import Checkpoint
from ..core.engine import Engine, Transform
from ..core.errors import UserError
from ..core.job import Job
from ..core.manifest import Manifest
from ..core.output import Output
from ..profile.run import Profile, build_profile, collect, save_profile
from .order import NotEnoughRemovable, RouterSpec, removal_count
from .transform import PruneOptions, PruneTransform, protected_experts


def prune_model(
    model: Any,
    output: Any,
    opts: PruneOptions,
    profile_dir: Any = None,
    calib: str = "mixed",
    samples: int = 64,
    seq_len: int = 256,
    batch_size: int = 8,
    device: torch.device | None = None,
    overwrite: bool = False,
    tokens: Any = None,
    command: str = "prune",
) -> Manifest:
    """Drop routed experts and write OUTPUT (HF folder + moecompress.json [+ report.html]); returns the manifest
    (its "prune" stage holds what was kept, removed and why).

    Everything is validated before any compute. Without ``profile_dir`` the model is profiled first (its run is
    written to OUTPUT/profile). ``tokens`` (a ``TokenSet``) replaces ``calib``/``samples``/``seq_len`` (API use,
    tests); with a profile that names its calibration windows, those are reused."""
    _flag_errors(opts.validate)
    first = Checkpoint(model)  # the ratio is refused before the calibration settings are checked
    first.family.check_routing(
        first.config, "expert pruning", removes_experts=True,
        needs_routing=opts.method == "output-error" or opts.refit != "none",
        hint="use --method frequency, routing-mass or reap with --refit none (they use the model's own routing)",
    )  # fmt: skip
    _flag_errors(
        lambda: removal_count(first.num_experts, opts.ratio, RouterSpec.from_config(first.family, first.config))
    )
    job = Job.prepare(
        first, output, calib=calib, samples=samples, seq_len=seq_len, seed=opts.seed, batch_size=batch_size,
        device=device, overwrite=overwrite, profile_dir=profile_dir, tokens=tokens, op="prune",
        settings={"method": opts.method, "refit": opts.refit, "error_tokens": opts.error_tokens},
    )  # fmt: skip
    ckpt = job.ckpt
    spec = RouterSpec.from_config(ckpt.family, ckpt.config)
    prof = job.profile()
    if prof is None:  # its own profile pass, without output similarity (nothing in prune reads it, and it evaluates
        # every expert on 256 tokens: as much expert compute as the routed forward at E128); the rest is bit for bit a
        # standalone profile's
        stats = collect(ckpt, job.tokens(), batch_size, job.device, sim_tokens=0)
        prof = build_profile(ckpt, job.tokens(), stats, job.elapsed)
    prune = _plan(job, spec, opts, prof)
    needs_tokens = opts.method == "output-error" or opts.refit != "none"
    no_windows = torch.zeros(0, 1, dtype=torch.long)  # experts chosen, nothing to refit: slice, no compute
    engine = job.engine("prune") if prune.wants_inputs else Engine(ckpt, no_windows, label="prune")
    cal = prof.meta.get("calibration") or {}
    warnings = [f"--{note}" for note in prune.notes]  # the section's warnings, as flags
    if not opts.protect_super and prof.super_experts:
        warnings.append(f"--no-protect-super: super experts {sorted(prof.super_experts)} may be removed")
    per_layer = opts.layout == "per-layer"
    manifest = Manifest(
        command, "per-layer" if per_layer else "uniform", "moecompress.load" if per_layer else "transformers",
        str(ckpt.path), ckpt.fingerprint, cal, ckpt.num_params, ckpt.bytes_on_disk, warnings=warnings,
    )  # fmt: skip
    with Output(job.out, overwrite) as out:
        out.add_globals(ckpt, [prune])
        _run(engine, [prune], out.add_layer)
        if profile_dir is None:
            save_profile(prof, out.tmp / "profile")  # type: ignore[operator]
        config = json.loads((ckpt.path / "config.json").read_text())
        prune.config(config)
        section = prune.section()
        del section["warnings"]
        manifest.add("prune", {
            **section,
            "profile": str(Path(profile_dir).resolve()) if profile_dir is not None else "profile",
            "calibration_fingerprint": cal.get("fingerprint"),
            "output_error_calibration": job.tokens().describe() if needs_tokens else None,
        })  # fmt: skip
        out.finish(
            ckpt, config, manifest, report_inputs=[Path(profile_dir)] if profile_dir else [], elapsed=job.elapsed
        )
    return manifest


def _plan(job: Job, spec: RouterSpec, opts: PruneOptions, prof: Profile) -> PruneTransform:
    """The pruning transform, its experts chosen already unless the pass chooses them (uniform output error).

    Score methods order by the profile; the per-layer layout (or non-sequential output error) first orders every
    layer in a measuring pass over the unpruned model, since a global ranking needs every layer."""
    E, layers = job.ckpt.num_experts, job.ckpt.moe_layers
    if opts.method != "output-error" or opts.decides_in_pass:
        return _flag_errors(lambda: PruneTransform.from_profile(spec, E, opts, prof, layers))
    measure = PruneTransform(spec, E, opts, protected_experts(prof, layers, opts.protect_super), measure=True)
    _run(job.engine("output-error order"), [measure])
    return _flag_errors(lambda: PruneTransform.from_profile(spec, E, opts, prof, layers, orders=measure.orders))


def _run(engine: Engine, transforms: list[Transform], emit: Any = None) -> None:
    try:
        engine.run(transforms, emit)
    except NotEnoughRemovable as err:
        raise UserError(f"{err}: lower --ratio or pass --no-protect-super") from None


def _flag_errors(fn: Any) -> Any:
    """``fn()``, its ValueError about an option (its message starts with the flag's name) as a UserError."""
    try:
        return fn()
    except NotEnoughRemovable as err:
        raise UserError(f"{err}: lower --ratio or pass --no-protect-super") from None
    except ValueError as err:
        raise UserError(f"--{err}") from None
