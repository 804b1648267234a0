"""`moecompress plan`: will it fit? Predicted peak host/GPU memory, activation-cache disk and time per operation,
from config.json alone (the weights may be absent), before any work. Registered by cli.main."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from ..core.errors import UserError
from ..core.limits import format_size, gpu_memory_bytes, host_memory_bytes, memory_limit, parse_size
from ..core.progress import out_console
from ..prune.transform import REFITS
from .common import INT_MAX, BatchOpt, MaxMemoryOpt, ModelArg, SamplesOpt, SeqLenOpt, check_numbers, user_errors

PLAN_OPS = ("profile", "prune", "atom", "merge", "quantize", "compress")


def _size(flag: str, text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return parse_size(text)
    except ValueError as err:
        raise UserError(f"{flag} {err}") from None


def plan_rows(
    model: object, ops: list[str], settings: dict[str, object], device: str, host: int, gpu: int
) -> tuple[object, list[dict[str, object]]]:
    """(shape, one row per op: the estimate and whether it fits ``host`` / ``gpu`` bytes)."""
    from ..estimate import predict, shape_of_folder
    from ..estimate.fits import verdict

    shape = shape_of_folder(model)  # type: ignore[arg-type]
    rows = []
    for op in ops:
        kw = dict(settings)
        if op != "prune":
            kw.pop("refit", None)
        if op not in ("prune", "quantize"):
            kw.pop("method", None)
        est = predict(shape, op, device=device, **kw)
        rows.append({"op": op, "estimate": est, "over": verdict(est, host, gpu, device)})
    return shape, rows


def plan(
    model: ModelArg = None,
    op: Annotated[str, typer.Option("--op", help="profile, prune, atom, merge, quantize, compress, or all.")] = "all",
    samples: SamplesOpt = 64,
    seq_len: SeqLenOpt = 256,
    batch_size: BatchOpt = 8,
    device: Annotated[
        str, typer.Option("--device", help="auto, cpu or cuda (cuda plans for a GPU this machine may lack).")
    ] = "auto",
    method: Annotated[
        str | None, typer.Option("--method", help="prune: output-error (default), reap, ...; quantize: gptq or rtn.")
    ] = None,
    refit: Annotated[str | None, typer.Option("--refit", help=f"prune: {', '.join(REFITS)}.")] = None,
    quant_plan: Annotated[str, typer.Option("--plan", help="quantize: lp or uniform.")] = "lp",
    hessian: Annotated[str, typer.Option("--hessian", help="atom: full, diag or lowrank.")] = "full",
    stages: Annotated[str, typer.Option("--stages", help="compress: stages in order, e.g. prune,quantize.")] = (
        "prune,quantize"
    ),
    reuse_profile: Annotated[
        bool, typer.Option("--reuse-profile", help="prune/compress: a --profile folder is given (no profile pass).")
    ] = False,
    host_memory: Annotated[
        str | None, typer.Option("--host-memory", help="Plan for this much RAM (default: this machine's).")
    ] = None,
    gpu_memory: Annotated[
        str | None, typer.Option("--gpu-memory", help="Plan for a GPU of this size, e.g. 80GB (default: this one's).")
    ] = None,
    max_memory: MaxMemoryOpt = None,
) -> None:
    """Predict, before any work, each operation's peak host and GPU memory, activation-cache disk and time, and
    whether it fits this machine (or --host-memory / --gpu-memory / --max-memory). Reads only config.json: a model
    folder without its weights works. Figures come from a cost model fitted on measured runs
    (bench/scale_bench.py); time is one CPU thread's.

    Examples:\n
      moecompress plan ./DeepSeek-V3 --samples 128 --seq-len 2048 --device cuda --gpu-memory 80GB\n
      moecompress plan ./Qwen3-30B-A3B --op quantize --plan uniform --max-memory 64GB
    """
    check_numbers(
        ("--samples", samples, 1, INT_MAX, True),
        ("--seq-len", seq_len, 2, INT_MAX, True),
        ("--batch-size", batch_size, 1, INT_MAX, True),
    )
    ops = list(PLAN_OPS) if op == "all" else [op]
    if op != "all" and op not in PLAN_OPS:
        raise UserError(f"--op {op!r} is not one of {', '.join(PLAN_OPS)}, all")
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device {device!r} is not one of auto, cpu, cuda")
    stage_list = [s.strip() for s in stages.split(",") if s.strip()]
    if not stage_list or any(s not in ("prune", "merge", "quantize", "atom") for s in stage_list):
        raise UserError(f"--stages {stages!r}: use a comma list of prune, merge, atom, quantize")
    host = _size("--host-memory", host_memory) or host_memory_bytes()
    gpu = _size("--gpu-memory", gpu_memory) or (gpu_memory_bytes("cuda") if device == "cuda" else 0)
    cap = memory_limit()
    if cap is not None:
        host, gpu = min(host, cap), (min(gpu, cap) if gpu else 0)
    settings: dict[str, object] = {
        "samples": samples, "seq_len": seq_len, "batch_size": batch_size, "method": method, "refit": refit,
        "plan": quant_plan, "hessian": hessian, "stages": stage_list, "profile_reused": reuse_profile,
        "max_memory": cap, "memory": (gpu if device == "cuda" else host) or None,
    }  # fmt: skip
    shape, rows = plan_rows(model, ops, settings, device, host, gpu)
    s = shape  # type: ignore[assignment]
    out_console.print(
        f"{s.model_type}: {s.layers} layers ({s.moe_layers} MoE), hidden {s.hidden}, {s.experts} experts of width "
        f"{s.width}, top-{s.top_k}; {_count(s.params)} parameters ({format_size(s.params * s.dtype_bytes)} at "
        f"{s.dtype_bytes} bytes each); calibration {samples} x {seq_len} = {samples * seq_len:,} tokens on {device}",
        highlight=False,
        soft_wrap=True,
    )
    gpu_text = format_size(gpu) if gpu else ("unknown" if device == "cuda" else "-")
    t = Table(title=f"predicted peaks (limit: host {format_size(host)}, GPU {gpu_text})")
    for col in ("operation", "host peak", "GPU peak", "cache on disk", "time (1 CPU thread)", "fits"):
        t.add_column(col)
    for r in rows:
        e = r["estimate"]
        t.add_row(
            f"{r['op']} ({e.variant})" if e.variant != r["op"] else r["op"],
            format_size(e.host_bytes),
            format_size(e.gpu_bytes) if device == "cuda" else "-",
            format_size(e.disk_bytes) if e.disk_bytes else "-",
            f"{_duration(e.seconds)} ({e.time_class})",
            "yes" if r["over"] is None else f"no: {r['over']}",
        )
    out_console.print(t)
    if device == "cuda":
        out_console.print("GPU times are not measured yet: the time column is one CPU thread's (an upper bound).")


def _count(n: int) -> str:
    return f"{n / 1e9:.1f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("min", 60.0)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def register(app: typer.Typer) -> None:
    """Add the `plan` command to the moecompress app."""
    app.command("plan")(user_errors(plan))
