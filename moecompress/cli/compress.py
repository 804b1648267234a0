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
) -> None:
    """Chain several operations in ONE layer-streamed pass and write one checkpoint.

    Layer l is pruned / merged / channel-pruned, then quantized, and its outputs computed with the compressed
    layer feed layer l + 1 (sequential calibration). One moecompress.json with a section per stage, one report.
    A one-stage prune, merge or atom recipe writes exactly what its single command writes; a quantize stage
    feeds the next layer the quantized weights (`moecompress quantize` the original ones). Recipes quantize at
    one width (2, 3, 4, 8 bits); the LP bit plan is `moecompress quantize --plan lp`.

    Examples:\n
      moecompress compress --prune 0.25 --bits 3 -o out/p25-q3\n
      moecompress compress ./Qwen3-30B-A3B --recipe recipe.yaml -o out/qwen
    """
    from ..compress import recipe as rc
    from ..compress.run import compress_model

    check_numbers(*calib_checks(samples, seq_len, seed, batch_size))
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


def register(app: typer.Typer) -> None:
    app.command()(compress)
