"""`moecompress quantize`: parse, validate, call ``quant.run.run_quantize``. Registered by cli.main."""

from __future__ import annotations

import math
import shlex
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.table import Table

from ..core.progress import console, out_console
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
    SeedOpt,
    SeqLenOpt,
    calib_checks,
    check_numbers,
    data_file,
    device_of,
    guard,
    user_errors,
)


@user_errors
def quantize(
    ctx: typer.Context,
    model: ModelArg = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="Output model folder.")] = Path("out/quantized"),
    bits: Annotated[
        float | None,
        typer.Option("--bits", help="Average bits per routed-expert weight (2, 3, 4, 8; fractional with --plan lp)."),
    ] = None,
    budget_gb: Annotated[
        float | None, typer.Option("--budget-gb", help="Total size of the output weights in GB (1e9 bytes).")
    ] = None,
    plan: Annotated[str, typer.Option(help="lp (global bit allocation) or uniform (every expert at --bits).")] = "lp",
    method: Annotated[str, typer.Option(help="gptq (per-expert Hessians from routed tokens) or rtn.")] = "gptq",
    granularity: Annotated[
        str, typer.Option(help="layer: one width per layer's experts (servable); expert: per-expert widths.")
    ] = "layer",
    other_bits: Annotated[
        int | None,
        typer.Option(
            "--other-bits",
            help="Attention / shared / dense weights: 2, 3, 4, 8 or 16 (keep); default 8 "
            "(gpt-oss: 16, its experts are written as MXFP4).",
        ),
    ] = None,
    plan_only: Annotated[bool, typer.Option("--plan-only", help="Write OUTPUT/bit_plan.json and stop.")] = False,
    profile: Annotated[
        Path | None, typer.Option("--profile", help="Profile run folder: importance and super experts.")
    ] = None,
    importance: Annotated[
        str, typer.Option(help="Expert importance in the LP cost: uniform, mass (routing mass) or reap (profile).")
    ] = "uniform",
    calib: CalibOpt = "mixed",
    samples: SamplesOpt = 32,
    seq_len: SeqLenOpt = 256,
    seed: SeedOpt = 0,
    batch_size: BatchOpt = 8,
    min_tokens: Annotated[
        int, typer.Option("--min-tokens", help="Experts with fewer routed tokens use RTN instead of GPTQ.")
    ] = 32,
    device: DeviceOpt = "auto",
    max_memory: MaxMemoryOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Quantize routed experts to 2/3/4/8 bits with a global bit plan; write a compressed-tensors checkpoint.

    The plan (bit_plan.json) gives each expert (or each layer, --granularity layer) a width so that the total
    measured MoE-block output error is minimal within the byte budget. Uniform-width outputs load with
    transformers' AutoModelForCausalLM.from_pretrained; every output loads exactly with moecompress.load.

    Examples:\n
      moecompress quantize --bits 4 --plan uniform -o out/q4\n
      moecompress quantize --bits 2.5 -o out/q2.5\n
      moecompress quantize --bits 3 --granularity expert --method rtn -o out/q3-expert\n
      moecompress quantize ./Qwen3-30B-A3B --budget-gb 14 --profile runs/qwen --plan-only -o out/plan
    """
    from ..quant.run import run_quantize

    check_numbers(
        *calib_checks(samples, seq_len, seed, batch_size),
        ("--bits", bits, 2, 8, False),
        ("--budget-gb", budget_gb, POSITIVE, math.inf, False),
        ("--other-bits", other_bits, 2, 16, True),
        ("--min-tokens", min_tokens, 0, INT_MAX, True),
    )
    dev = device_of(device)
    guard([(output, "dir")], model, [profile, data_file(calib)], overwrite)
    plan_d = run_quantize(
        model, output, bits=bits, budget_gb=budget_gb, plan=plan, method=method, granularity=granularity,
        other_bits=other_bits, plan_only=plan_only, profile=profile, importance=importance, calib=calib,
        samples=samples, seq_len=seq_len, seed=seed, batch_size=batch_size, min_tokens=min_tokens, device=dev,
        overwrite=overwrite, command=_command_line(ctx),
    )  # fmt: skip
    t = Table(title="bit plan")
    t.add_column("layer")
    t.add_column("widths")
    t.add_column("bytes", justify="right")
    for l, d in plan_d["layers"].items():
        counts = {}
        for r in d["experts"]:
            counts[r["bits"]] = counts.get(r["bits"], 0) + 1
        widths = ", ".join(f"{n}x{b}b" for b, n in sorted(counts.items()))
        t.add_row(l, widths, f"{sum(r['bytes'] for r in d['experts']):,}")
    out_console.print(t)
    cost = plan_d["predicted_cost"]
    out_console.print(
        f"average {plan_d['average_bits_routed']:.3f} bits per routed-expert weight; "
        f"{plan_d['total_bytes']:,} bytes of weights" + (f"; predicted cost {cost:.4g}" if cost is not None else "")
    )
    if plan_d["few_token_experts"]:
        console.print(f"[yellow]warning:[/] {len(plan_d['few_token_experts'])} experts had too few tokens: RTN used")
    out_console.print(f"{'plan written to' if plan_only else 'quantized model written to'} {output}")


def _command_line(ctx: click.Context) -> str:
    """The command as the user would type it (non-default options only), for moecompress.json."""
    parts = ["moecompress", "quantize"]
    for p in ctx.command.params:
        v = ctx.params.get(p.name)
        if p.name == "model":
            if v is not None:
                parts.append(shlex.quote(str(v)))
            continue
        if v == p.default or v is None:
            continue
        flag = max(p.opts, key=len)
        parts += [flag] if v is True else [flag, shlex.quote(str(v))]
    return " ".join(parts)


def register(app: typer.Typer) -> None:
    """Add the `quantize` command to the moecompress app."""
    app.command("quantize")(quantize)
