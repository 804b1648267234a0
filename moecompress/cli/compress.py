"""`moecompress compress`: parse, validate, call ``compress.run.compress_model``. Registered by cli.main."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..core.errors import UserError
from ..core.progress import out_console
from .common import (
    BatchOpt,
    CalibOpt,
    DeviceOpt,
    MaxMemoryOpt,
    ModelArg,
    OverwriteOpt,
    SamplesOpt,
    SeedOpt,
    SeqLenOpt,
    calib_checks,
    check_numbers,
    data_file,
    device_of,
    guard,
    user_errors,
)

RecipeOpt = Annotated[
    Path | None,
    typer.Option("--recipe", help="YAML or JSON list of stages: `- prune: {ratio: 0.25}`, `- quantize: {bits: 3}`."),
]
PruneOpt = Annotated[float | None, typer.Option("--prune", help="Shorthand: remove this fraction of routed experts.")]
MergeOpt = Annotated[float | None, typer.Option("--merge", help="Shorthand: merge away this fraction of experts.")]
AtomOpt = Annotated[float | None, typer.Option("--atom", help="Shorthand: remove this fraction of expert channels.")]
BitsOpt = Annotated[int | None, typer.Option("--bits", help="Shorthand: quantize routed experts to 2, 3, 4 or 8 bits.")]
BudgetGbOpt = Annotated[
    float | None,
    typer.Option("--budget-gb", help="Plan removal, channel widths and bits together for this many GB of tensors."),
]
BudgetRatioOpt = Annotated[
    float | None, typer.Option("--budget-ratio", help="As --budget-gb, as a fraction of the model's bf16 size.")
]
ServableOpt = Annotated[
    bool,
    typer.Option(
        "--servable/--exact",
        help="With a budget: one expert count and width for the whole model, one bit width per layer (vLLM serves "
        "it; transformers loads it when one bit width is chosen); default: per-expert choices (moecompress.load).",
    ),
]
OtherBitsOpt = Annotated[
    int, typer.Option("--other-bits", help="With a budget: bits of attention/shared/dense weights (4, 8 or 16).")
]
CheckOpt = Annotated[
    bool,
    typer.Option(
        "--check/--no-check",
        help="With a budget: write a plan that removes or cuts experts only if it beats the quantize-only plan in KL "
        "on the calibration windows (one more pass; a third when the quantize-only plan wins).",
    ),
]


@user_errors
def compress(
    model: ModelArg = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="Output model folder (created).")] = Path(
        "out/compressed"
    ),
    recipe: RecipeOpt = None,
    prune: PruneOpt = None,
    merge: MergeOpt = None,
    atom: AtomOpt = None,
    bits: BitsOpt = None,
    budget_gb: BudgetGbOpt = None,
    budget_ratio: BudgetRatioOpt = None,
    servable: ServableOpt = False,
    other_bits: OtherBitsOpt = 8,
    check: CheckOpt = True,
    profile: Annotated[
        Path | None, typer.Option("--profile", help="Profile run folder to reuse (else one profiling pass runs first).")
    ] = None,
    calib: CalibOpt = "mixed",
    samples: SamplesOpt = 64,
    seq_len: SeqLenOpt = 256,
    seed: SeedOpt = 0,
    batch_size: BatchOpt = 8,
    device: DeviceOpt = "auto",
    overwrite: OverwriteOpt = False,
    max_memory: MaxMemoryOpt = None,
) -> None:
    """Chain several operations in ONE layer-streamed pass and write one checkpoint.

    Layer l is pruned / merged / channel-pruned, then quantized, and its outputs computed with the compressed
    layer feed layer l + 1 (sequential calibration). One moecompress.json with a section per stage, one report.
    A one-stage prune, merge or atom recipe writes exactly what its single command writes; a quantize stage
    feeds the next layer the quantized weights (`moecompress quantize` the original ones). Recipes quantize at
    one width (2, 3, 4, 8 bits); the LP bit plan is `moecompress quantize --plan lp`.

    With --budget-gb / --budget-ratio, one integer program chooses for every routed expert: removed, or kept at
    100/75/50% of its channels, at 2, 3, 4 or 8 bits, minimizing the predicted KL (measured per option on the
    calibration data) within the byte budget; plan.json lists every choice with its predicted cost and bytes.

    Examples:\n
      moecompress compress --prune 0.25 --bits 3 -o out/p25-q3\n
      moecompress compress ./Qwen3-30B-A3B --recipe recipe.yaml -o out/qwen\n
      moecompress compress --budget-ratio 0.3 -o out/b30            (exact layout, moecompress.load)\n
      moecompress compress ./Qwen3-30B-A3B --budget-gb 14 --servable -o out/q14
    """
    from ..compress import recipe as rc
    from ..compress.run import compress_model

    check_numbers(*calib_checks(samples, seq_len, seed, batch_size))
    if budget_gb is not None or budget_ratio is not None:
        _budget(model, output, recipe, prune, merge, atom, bits, budget_gb, budget_ratio, servable, other_bits,
                profile, calib, samples, seq_len, seed, batch_size, device, overwrite, check)  # fmt: skip
        return
    if servable or other_bits != 8 or not check:
        raise UserError("--servable/--exact, --other-bits and --no-check go with --budget-gb or --budget-ratio (a "
                        "recipe's quantize stage takes other_bits)")  # fmt: skip
    if recipe is not None and any(v is not None for v in (prune, merge, atom, bits)):
        raise UserError("give either --recipe or the shorthand flags (--prune/--merge/--atom/--bits), not both")
    stages = rc.load(recipe) if recipe is not None else rc.from_flags(prune, merge, atom, bits)
    guard([(output, "dir")], model, others=[profile, data_file(calib), recipe], overwrite=overwrite)
    man = compress_model(
        model, output, stages, calib=calib, samples=samples, seq_len=seq_len, seed=seed, batch_size=batch_size,
        device=device_of(device), overwrite=overwrite, profile_dir=profile,
    )  # fmt: skip
    out_console.print(
        f"compress: {' -> '.join(s.describe() for s in stages)}: {man.bytes_before:,} -> {man.bytes_after:,} bytes "
        f"({man.bytes_after / max(man.bytes_before, 1):.1%}) in one pass, {man.elapsed_s} s -> {output}",
        highlight=False,
    )


def _budget(model, output, recipe, prune, merge, atom, bits, budget_gb, budget_ratio, servable, other_bits, profile,
            calib, samples, seq_len, seed, batch_size, device, overwrite, check=True) -> None:  # fmt: skip
    """compress --budget-gb/--budget-ratio: the planner (moecompress.budget)."""
    from ..budget.run import budget_compress

    given = [f for f, v in (("--recipe", recipe), ("--prune", prune), ("--merge", merge), ("--atom", atom),
                            ("--bits", bits)) if v is not None]  # fmt: skip
    if given:
        raise UserError(f"--budget-gb/--budget-ratio plan every stage themselves: drop {', '.join(given)}")
    if budget_gb is not None and budget_ratio is not None:
        raise UserError("give one of --budget-gb or --budget-ratio, not both")
    guard([(output, "dir")], model, others=[profile, data_file(calib)], overwrite=overwrite)
    man = budget_compress(
        model, output, budget_gb=budget_gb, budget_ratio=budget_ratio, servable=servable, other_bits=other_bits,
        calib=calib, samples=samples, seq_len=seq_len, seed=seed, batch_size=batch_size, device=device_of(device),
        overwrite=overwrite, profile_dir=profile, check=check,
    )  # fmt: skip
    st = man.stage("budget") or {}
    switched = (st.get("check") or {}).get("chosen") == "bits_only"
    kind = " quantize-only (it beat the joint plan on the calibration windows)" if switched else ""
    out_console.print(
        f"compress --budget: {st.get('layout')}{kind} plan, predicted KL {st.get('predicted_cost', 0):.4g}, "
        f"{st.get('written_tensor_bytes', 0):,} of {st.get('budget_bytes', 0):,} budget bytes "
        f"({man.bytes_before:,} -> {man.bytes_after:,} bytes on disk) in {man.elapsed_s} s -> {output} "
        f"(plan.json; load with {man.load_with})",
        highlight=False,
    )


def register(app: typer.Typer) -> None:
    app.command()(compress)
