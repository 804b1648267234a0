"""`moecompress merge`: parse, validate, call ``merge.run.merge_model``. Registered by cli.main."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..core.progress import out_console
from .common import (
    INT_MAX,
    POSITIVE,
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


@user_errors
def merge(
    model: ModelArg = None,
    ratio: Annotated[float, typer.Option("--ratio", help="Fraction of experts merged away per layer (0-1).")] = 0.5,
    output: Annotated[Path, typer.Option("-o", "--output", help="Output model folder.")] = Path("out/merged"),
    method: Annotated[str, typer.Option(help="subspace (Sub-MoE shared-SVD merge) or average (HC-SMoE).")] = "subspace",
    rank: Annotated[int | None, typer.Option("--rank", help="SVD rank kept per merged projection.")] = None,
    rank_fraction: Annotated[
        float | None, typer.Option("--rank-fraction", help="SVD rank as a fraction of full rank (default: full).")
    ] = None,
    profile: Annotated[
        Path | None, typer.Option("--profile", help="Profile run folder: frequencies, similarities, super experts.")
    ] = None,
    router: Annotated[str, typer.Option(help="Router rows: fit (on calibration tokens) or average.")] = "fit",
    similarity: Annotated[str, typer.Option(help="Clustering similarity: output or router (logits).")] = "output",
    protect: Annotated[bool, typer.Option(help="Keep super experts (from --profile) unmerged.")] = True,
    align: Annotated[
        bool | None,
        typer.Option("--align/--no-align", help="Match neurons before merging (default: on for subspace only)."),
    ] = None,
    refit: Annotated[
        bool | None,
        typer.Option(
            "--refit/--no-refit", help="Refit merged down projections on calibration tokens (default: subspace)."
        ),
    ] = None,
    calib: CalibOpt = "mixed",
    samples: SamplesOpt = 64,
    seq_len: SeqLenOpt = 256,
    sim_tokens: Annotated[int, typer.Option("--sim-tokens", help="Tokens per layer for output similarity.")] = 512,
    seed: Annotated[int, typer.Option(help="Seed for sampling and k-means.")] = 0,
    choose: Annotated[bool, typer.Option(help="Measured best merge per cluster (default) or --method for all.")] = True,
    batch_size: BatchOpt = 8,
    device: DeviceOpt = "auto",
    overwrite: OverwriteOpt = False,
    max_memory: MaxMemoryOpt = None,
) -> None:
    """Cluster each MoE layer's experts and merge every cluster into one expert: fewer experts, smaller files.

    Examples:\n
      moecompress merge --ratio 0.5 -o out/merged\n
      moecompress merge ./Qwen3-30B-A3B --ratio 0.25 --rank-fraction 0.5 --profile runs/qwen -o out/qwen-merged\n
      moecompress merge --ratio 0.5 --method average --no-choose -o out/hc-smoe
    """
    from ..merge.run import MergeOptions, merge_model

    check_ratio("--ratio", ratio, "the fraction of experts merged away")
    check_numbers(
        *calib_checks(samples, seq_len, seed, batch_size),
        ("--rank", rank, 1, INT_MAX, True),
        ("--rank-fraction", rank_fraction, POSITIVE, 1.0, False),
        ("--sim-tokens", sim_tokens, 2, INT_MAX, True),
    )
    dev = device_of(device)
    guard([(output, "dir")], model, [profile, data_file(calib)], overwrite)
    opts = MergeOptions(
        ratio=ratio, method=method, rank=rank, rank_fraction=rank_fraction, router=router, similarity=similarity,
        protect_super=protect, align=align, refit=refit, sim_tokens=sim_tokens, seed=seed, choose=choose,
    )  # fmt: skip
    man = merge_model(model, output, opts, profile, calib, samples, seq_len, batch_size, dev, overwrite)
    sec = man.stage("merge") or {}
    before, after = man.bytes_before, man.bytes_after or 0
    out_console.print(
        f"merged {sec['experts_before']} -> {sec['experts_after']} experts per layer ({method}) in "
        f"{man.elapsed_s or 0:.1f}s: {before:,} -> {after:,} bytes ({1 - after / before:.1%} smaller) -> {output}"
    )


def register(app: typer.Typer) -> None:
    """Add the `merge` command to the moecompress app."""
    app.command("merge")(merge)
