"""`moecompress prune`: parse, validate, call ``prune.run.prune_model`` (whole experts) or ``atomic_prune`` (atoms)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..core.errors import UserError
from ..core.manifest import Manifest
from ..core.progress import console, out_console
from ..prune.transform import DEFAULT_METHOD, DEFAULT_REFIT, METHODS, REFITS, default_refit
from .common import (
    INT_MAX,
    BatchOpt,
    CalibOpt,
    DeviceOpt,
    MaxMemoryOpt,
    ModelArg,
    OverwriteOpt,
    SamplesOpt,
    SeqLenOpt,
    calib_checks,
    check_numbers,
    check_ratio,
    data_file,
    device_of,
    guard,
    user_errors,
)

GRANULARITIES = ("expert", "atom")
ATOM_REFITS = ("down", "none")


def prune(
    ratio: Annotated[
        float,
        typer.Option("--ratio", help="Fraction removed (0-1): of routed experts, or of atoms.", show_default=False),
    ],
    model: ModelArg = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="Output model folder (created).")] = Path("out/pruned"),
    method: Annotated[
        str | None,
        typer.Option(help=f"expert: {', '.join(METHODS)} (default {DEFAULT_METHOD}); atom: heapr or magnitude."),
    ] = None,
    granularity: Annotated[str, typer.Option(help="expert (drop whole experts) or atom (drop expert channels).")] = (
        "expert"
    ),
    layout: Annotated[
        str,
        typer.Option(
            help="uniform (same count everywhere; stock transformers/vLLM load it), per-layer (expert: global "
            "ranking) or exact (atom: per-expert widths); non-uniform outputs load with moecompress.load."
        ),
    ] = "uniform",
    profile: Annotated[
        Path | None, typer.Option("--profile", help="Profile run folder to reuse (must be of this MODEL).")
    ] = None,
    protect_super: Annotated[
        bool, typer.Option("--protect-super/--no-protect-super", help="Keep the profile's super experts.")
    ] = True,
    error_tokens: Annotated[
        int, typer.Option("--error-tokens", help="output-error: calibration tokens per layer for the greedy search.")
    ] = 4096,
    refit: Annotated[
        str | None,
        typer.Option(
            help=f"After removal, refit on calibration tokens. expert: {', '.join(REFITS)} (default"
            f" {DEFAULT_REFIT} with output-error, none with the score methods, which work on every model type);"
            f" atom: {' or '.join(ATOM_REFITS)} (default {ATOM_REFITS[0]}: least-squares refit of the kept down_proj"
            " columns).",
            show_default=False,
        ),
    ] = None,
    hessian: Annotated[str, typer.Option(help="atom only: G_e approximation full, diag or lowrank.")] = "full",
    rank: Annotated[int, typer.Option(help="atom only: rank of the lowrank G_e sketch.")] = 32,
    calib: CalibOpt = "mixed",
    samples: SamplesOpt = 64,
    seq_len: SeqLenOpt = 256,
    seed: Annotated[int, typer.Option(help="Seed for window sampling (and --method random).")] = 0,
    batch_size: BatchOpt = 8,
    device: DeviceOpt = "auto",
    overwrite: OverwriteOpt = False,
    max_memory: MaxMemoryOpt = None,
) -> None:
    """Remove the least important routed experts (or expert channels) and write a smaller HF model folder.

    Without --profile it profiles MODEL first (same options as `profile`). Super experts and shared experts are
    kept unless --no-protect-super. The output loads with AutoModelForCausalLM.from_pretrained (uniform layout)
    or moecompress.load (per-layer / exact layouts).

    Examples:\n
      moecompress prune --ratio 0.25 -o out/pruned\n
      moecompress prune ./Qwen3-30B-A3B --ratio 0.5 --method frequency --profile runs/qwen -o out/qwen-50\n
      moecompress prune --ratio 0.25 --method output-error --layout per-layer -o out/naee\n
      moecompress prune --ratio 0.25 --granularity atom --hessian diag -o out/atoms
    """
    check_ratio("--ratio", ratio, "the fraction of routed experts (or atoms) removed")
    check_numbers(
        *calib_checks(samples, seq_len, seed, batch_size),
        ("--error-tokens", error_tokens, 1, INT_MAX, True),
        ("--rank", rank, 1, INT_MAX, True),
    )
    if granularity not in GRANULARITIES:
        raise UserError(f"--granularity {granularity!r} is not one of {', '.join(GRANULARITIES)}")
    dev = device_of(device)
    guard([(output, "dir")], model, [profile, data_file(calib)], overwrite)
    if granularity == "atom":
        from ..atomic.run import atomic_prune

        if layout == "per-layer":
            raise UserError("--layout per-layer is for --granularity expert; atoms use uniform or exact")
        score = method or "heapr"
        if refit not in (None, *ATOM_REFITS):
            raise UserError(f"--refit {refit!r} is not one of {', '.join(ATOM_REFITS)} for --granularity atom")
        res = atomic_prune(
            model, output, ratio, hessian=hessian, layout=layout, score=score, profile=profile, calib=calib,
            samples=samples, seq_len=seq_len, seed=seed, batch_size=batch_size, rank=rank,
            protect_super=protect_super, device=dev, overwrite=overwrite, refit=refit != "none",
        )  # fmt: skip
        for w in res.get("warnings") or []:
            console.print(f"[yellow]warning:[/] {w}")
        out_console.print(
            f"atomic prune ({res.get('method')}, {res['layout']}): removed "
            f"{res['routed_channels_removed_fraction']:.1%} of routed channels = "
            f"{res['params_removed_fraction_of_all']:.1%} of all parameters -> {output}"
        )
        return
    if layout == "exact":
        raise UserError("--layout exact is for --granularity atom; whole experts use uniform or per-layer")
    from ..prune.run import prune_model
    from ..prune.transform import PruneOptions

    opts = PruneOptions(
        ratio=ratio, method=method or DEFAULT_METHOD, layout=layout, protect_super=protect_super, seed=seed,
        error_tokens=error_tokens, refit=refit or default_refit(method or DEFAULT_METHOD),
    )  # fmt: skip
    _summary(prune_model(model, output, opts, profile, calib, samples, seq_len, batch_size, dev, overwrite), output)


def _summary(man: Manifest, output: Path) -> None:
    """Warnings to stderr; what was protected and removed, and the sizes, to stdout."""
    stage = man.stage("prune") or {}
    for w in man.warnings:
        console.print(f"[yellow]warning:[/] {w}")
    sup = [f"L{l}E{e}" for l, e in stage["protected"]]
    shared = sorted({p["module"] for p in stage["protected_why"] if p["why"] == "shared"})
    out_console.print(
        f"protected: super experts {', '.join(sup) if sup else 'none'}"
        + (f"; shared experts ({', '.join(shared)}) are never pruned" if shared else "")
    )
    counts = [v["num_experts"] for v in stage["layers"].values()]
    per = f"{counts[0]}" if len(set(counts)) == 1 else f"{min(counts)}-{max(counts)} (per layer: {counts})"
    after = man.bytes_after or 0
    out_console.print(
        f"pruned {stage['experts_before']} -> {per} experts per MoE layer ({stage['method']}, {man.layout}) in "
        f"{man.elapsed_s or 0:.1f}s: {man.bytes_before:,} -> {after:,} bytes ({1 - after / man.bytes_before:.1%} "
        f"smaller) -> {output}"
    )
    if man.layout != "uniform":
        out_console.print("per-layer layout: load it exactly with moecompress.load(path)")


def register(app: typer.Typer) -> None:
    """Add the `prune` command to the moecompress app."""
    app.command("prune")(user_errors(prune))
