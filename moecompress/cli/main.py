"""The `moecompress` command line. It parses, validates and calls the library; nothing more."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..core.errors import UserError
from ..core.progress import console, out_console
from ..version import __version__
from . import compress as compress_cli
from . import merge as merge_cli
from . import plan as plan_cli
from . import prune as prune_cli
from . import quantize as quantize_cli
from . import report as report_cli
from .common import (
    INT_MAX,
    BatchOpt,
    CalibOpt,
    DeviceOpt,
    FileOverwriteOpt,
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
    write_json,
)

app = typer.Typer(
    name="moecompress",
    help="Make Mixture-of-Experts language models smaller while keeping them good.\n\n"
    "With no MODEL, every command uses the small MoE that ships inside the package.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        out_console.print(f"moecompress {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    pass


@app.command()
@user_errors
def info(
    model: ModelArg = None,
    json_out: Annotated[
        Path | None, typer.Option("-o", "--output", "--json", help="Also write the facts as JSON here.")
    ] = None,
    overwrite: FileOverwriteOpt = False,
) -> None:
    """Show what moecompress sees in a model: family, MoE layers, experts, top-k, size, layout.

    Examples:\n
      moecompress info\n
      moecompress info ./Qwen3-30B-A3B --json facts.json
    """
    from ..core.checkpoint import Checkpoint

    guard([(json_out, "file")], model, overwrite=overwrite)
    ck = Checkpoint(model)  # reads moecompress.json strictly too
    cfg = ck.config
    fam = ck.family
    facts = {
        "model": str(ck.path),
        "family": fam.name,
        "model_type": cfg.model_type,
        "layers": cfg.num_hidden_layers,
        "moe_layers": ck.moe_layers,
        "dense_layers": sorted(set(range(cfg.num_hidden_layers)) - set(ck.moe_layers)),
        "routed_experts": ck.num_experts,
        "top_k": ck.top_k,
        "norm_topk": fam.norm_topk(cfg),
        "n_group": fam.n_group(cfg),
        "shared_experts": fam.shared,
        "routing": fam.routing_summary(),
        "hidden_size": cfg.hidden_size,
        "params": ck.num_params,
        "bytes": ck.bytes_on_disk,
        "fingerprint": ck.fingerprint,
        "layout": ck.layout,
        "compressed_by": ck.manifest.command if ck.manifest is not None else None,
        "stages": [s["op"] for s in ck.manifest.stages] if ck.manifest is not None else [],
        "warnings": list(
            dict.fromkeys(ck.manifest.warnings + [w for s in ck.manifest.stages for w in s.get("warnings") or []])
        )
        if ck.manifest is not None
        else [],
    }
    t = Table(show_header=False, box=None)
    for k, v in facts.items():
        if k != "warnings":
            t.add_row(f"[bold]{k}", str(v))
    out_console.print(t)
    for w in facts["warnings"]:  # what the operations that wrote it said about it (e.g. atom's padded shared experts)
        out_console.print(f"note: {w}")
    if facts["layout"] != "uniform":
        out_console.print(f"layout {facts['layout']!r}: load it exactly with moecompress.load(path)")
    if json_out:
        write_json(facts, json_out, overwrite)


@app.command()
@user_errors
def profile(
    model: ModelArg = None,
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Run folder for profile.json/.safetensors (created).")
    ] = Path("runs/profile"),
    calib: CalibOpt = "mixed",
    samples: SamplesOpt = 64,
    seq_len: SeqLenOpt = 256,
    seed: SeedOpt = 0,
    batch_size: BatchOpt = 8,
    sim_tokens: Annotated[
        int, typer.Option("--sim-tokens", help="Tokens sampled per layer for output similarity.")
    ] = 256,
    min_tokens: Annotated[
        int | None,
        typer.Option("--min-tokens", help="Flag experts with fewer routed tokens (default: 5% of fair share)."),
    ] = None,
    device: DeviceOpt = "auto",
    overwrite: OverwriteOpt = False,
    max_memory: MaxMemoryOpt = None,
) -> None:
    """Measure every routed expert in one layer-streamed pass over calibration data.

    Writes OUTPUT/profile.json (frequency, routing mass, REAP saliency, max |down_proj out|, super experts)
    and OUTPUT/profile.safetensors (per-channel moments, similarities, per-domain counts).

    Examples:\n
      moecompress profile -o runs/base\n
      moecompress profile ./Mixtral-8x7B --calib data.jsonl --samples 256 --seq-len 2048 -o runs/mixtral
    """
    from ..profile.run import run_profile

    check_numbers(
        *calib_checks(samples, seq_len, seed, batch_size),
        ("--sim-tokens", sim_tokens, 2, INT_MAX, True),
        ("--min-tokens", min_tokens, 0, INT_MAX, True),
    )
    dev = device_of(device)
    guard([(output, "dir")], model, [data_file(calib)], overwrite)
    prof = run_profile(model, output, calib, samples, seq_len, seed, batch_size, dev, sim_tokens, overwrite, min_tokens)
    meta = prof.meta
    out_console.print(
        f"profiled {meta['family']} model: {len(meta['moe_layers'])} MoE layers x {meta['num_experts']} experts "
        f"on {meta['tokens']:,} tokens in {meta['elapsed_s']:.1f}s -> {output}"
    )
    sup = meta["super_experts"]
    out_console.print(f"super experts: {', '.join(f'L{l}E{e}' for l, e in sup) if sup else 'none'}")
    for w in meta["warnings"][:10]:
        console.print(f"[yellow]warning:[/] {w}")
    if len(meta["warnings"]) > 10:
        console.print(f"[yellow]warning:[/] ... and {len(meta['warnings']) - 10} more (see profile.json)")


@app.command("eval")
@user_errors
def eval_cmd(
    model: ModelArg = None,
    base: Annotated[Path | None, typer.Option(help="Base model folder to compare with (KL, top-1 agreement).")] = None,
    data: Annotated[str, typer.Option(help="Built-in set (a domain or mixed) or a .txt/.jsonl file.")] = "mixed",
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per window (at least 2).")] = 256,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per forward batch (at least 1).")] = 8,
    max_windows: Annotated[
        int | None, typer.Option("--max-windows", help="Cap windows per domain (at least 1; default: no cap).")
    ] = None,
    unigram: Annotated[bool, typer.Option(help="Also report an add-one unigram baseline perplexity.")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results as JSON here.")] = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Same as --json.")] = None,
    device: DeviceOpt = "auto",
    overwrite: FileOverwriteOpt = False,
) -> None:
    """Held-out perplexity per domain; with --base, KL(base || model) and top-1 agreement; params and bytes.

    Examples:\n
      moecompress eval\n
      moecompress eval out/pruned --base ./base-model --json out/pruned/eval.json
    """
    from ..core.checkpoint import resolve_model
    from ..core.evaluate import evaluate, unigram_perplexity

    check_numbers(
        ("--seq-len", seq_len, 2, INT_MAX, True),
        ("--batch-size", batch_size, 1, INT_MAX, True),
        ("--max-windows", max_windows, 1, INT_MAX, True),
    )
    if json_out is not None and output is not None and json_out != output:
        raise UserError("--json and -o/--output are the same option: give only one of them")
    target = json_out or output
    dev = device_of(device)
    base_dir = resolve_model(base) if base is not None else None
    guard([(target, "file")], model, [base_dir, data_file(data)], overwrite, sidecars_in_model=True)
    res = evaluate(model, base, data, seq_len, batch_size, dev, max_windows)
    if unigram:
        res["unigram_perplexity"] = unigram_perplexity(model, data, seq_len)
    t = Table(title=f"moecompress eval: {res['model']}")
    t.add_column("domain")
    t.add_column("perplexity", justify="right")
    if unigram:
        t.add_column("unigram", justify="right")
    for d, v in res["perplexity"].items():
        row = [d, f"{v:.2f}"]
        if unigram:
            row.append(f"{res['unigram_perplexity'][d]:.1f}")
        t.add_row(*row)
    out_console.print(t)
    if res["kl_to_base"] is not None:
        out_console.print(
            f"KL(base || model) = {res['kl_to_base']:.3g}   top-1 agreement = {res['top1_agreement']:.4f}"
        )
    out_console.print(f"params {res['params']:,}   bytes on disk {res['bytes']:,}")
    if target:
        write_json(res, target, overwrite)


# the other commands live one per module, each with register(app); help lists them in this order
for _command in (merge_cli, report_cli, prune_cli, quantize_cli, compress_cli, plan_cli):
    _command.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
