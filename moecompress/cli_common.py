"""Shared CLI pieces: the MODEL argument, --device, -o, and the one-line error convention (exit 2)."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import torch
import typer

from .errors import UserError
from .progress import console
from .stream import resolve_device

F = TypeVar("F", bound=Callable[..., Any])

ModelArg = Annotated[
    Path | None,
    typer.Argument(help="Local Hugging Face model folder. Omit it to use the built-in model.", show_default=False),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (cuda when available), cpu or cuda.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace OUTPUT if it exists.")]


def device_of(name: str) -> torch.device:
    return resolve_device(name)


def user_errors(fn: F) -> F:
    """Print a UserError as one line on stderr and exit with code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def write_json(obj: Any, path: Path | None) -> None:
    text = json.dumps(obj, indent=2)
    if path is None:
        sys.stdout.write(text + "\n")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text + "\n")
        tmp.rename(path)


# Calibration options shared by every command that runs a calibration pass (defaults are set per command).
CalibOpt = Annotated[
    str, typer.Option(help="Calibration data: built-in set (shakespeare, bible, python, austen, mixed) or .txt/.jsonl.")
]
SamplesOpt = Annotated[int, typer.Option(help="Number of calibration windows.")]
SeqLenOpt = Annotated[int, typer.Option("--seq-len", help="Tokens per window.")]
SeedOpt = Annotated[int, typer.Option(help="Seed for window sampling.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Windows per forward batch.")]
