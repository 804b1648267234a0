"""Shared CLI pieces: the MODEL argument, --device, -o, option checks, the output guard and the one-line errors.

Every command body starts with ``check_numbers`` (ranges, before any work) and ``guard`` (its outputs against its
inputs, with the temporaries created before any compute). ``user_errors`` turns a UserError, a write that fails
(disk full, read-only, permission) and Ctrl-C into one line on stderr (exit 2, or 130 when interrupted), and
removes whatever temporary was not renamed into place.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import torch
import typer
from rich.text import Text

from ..core import dist, writer
from ..core.errors import UserError
from ..core.progress import console
from ..core.stream import resolve_device

F = TypeVar("F", bound=Callable[..., Any])

INT_MAX = 2**31 - 1
POSITIVE = 5e-324  # check_numbers: low bound meaning "greater than 0"

ModelArg = Annotated[
    Path | None,
    typer.Argument(help="Local Hugging Face model folder. Omit it to use the built-in model.", show_default=False),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (cuda when available), cpu or cuda.")]
OverwriteOpt = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Replace OUTPUT if it exists: only a folder moecompress wrote (moecompress.json or profile.json in it) "
        "or an empty one, never an input. " + writer.TEMP_HELP + " Stale temporaries of killed runs are removed by "
        "the next run into the same folder.",
    ),
]
FileOverwriteOpt = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Replace an existing output file (never an input or a file inside an input folder). " + writer.TEMP_HELP,
    ),
]


def device_of(name: str) -> torch.device:
    return resolve_device(name)


def _one_line(msg: str) -> None:
    console.print(Text.assemble(("error:", "bold red"), " " + " ".join(str(msg).split())), soft_wrap=True)


def _write_failure(err: OSError) -> str:
    """One line for an OSError such as a full disk: which output (its temporary is removed), or which file."""
    reason = err.strerror or str(err)
    name = str(err.filename or "")
    for r in writer._RESERVED.values():
        if name.startswith(str(r.tmp)) or name == str(r.out):
            return f"cannot write {r.out}: {reason}; the partial output was removed and nothing was written"
    return f"{reason}: {name or 'an output'}; nothing was written"


def _release_uninterrupted() -> list[Path]:
    """writer.release_reserved with Ctrl-C held off, so a second Ctrl-C cannot leave half a temporary behind."""
    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    try:
        return writer.release_reserved()
    finally:
        if old is not None:
            signal.signal(signal.SIGINT, old)


def user_errors(fn: F) -> F:
    """Run a command: UserError or a failed write -> one line on stderr, exit 2; Ctrl-C -> one line, exit 130.

    Temporaries reserved by ``guard`` that were not renamed into place are removed in every case.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        code = 0
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            _one_line(str(err))
            code = 2
        except KeyboardInterrupt:
            code = 130
        except Exception as err:  # an OSError (or safetensors I/O error) while writing: one line, not a traceback
            os_err = writer.as_os_error(err)
            if os_err is None or os_err.errno not in writer.WRITE_ERRNOS:
                raise
            _one_line(_write_failure(os_err))
            code = 2
        finally:
            done = _release_uninterrupted()
            if code == 130:
                what = f"already written: {', '.join(map(str, done))}" if done else "nothing was written"
                console.print(f"interrupted; {what}", highlight=False, soft_wrap=True, markup=False)
            if code and dist.broken():  # a peer left: gloo may abort at teardown, so leave now with our code
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        raise typer.Exit(code)

    return wrapper  # type: ignore[return-value]


def check_numbers(*checks: tuple[str, float | int | None, float, float, bool]) -> None:
    """Refuse a numeric option out of its range before any work: (flag, value, low, high, whole number?).

    ``None`` means "not given". Floats must be finite; low ``POSITIVE`` means "greater than 0". The message
    states the allowed range.
    """
    for flag, value, lo, hi, whole in checks:
        if value is None or (math.isfinite(value) and lo <= value <= hi):
            continue
        low = "greater than 0" if lo == POSITIVE else f"at least {lo:g}"
        high = "" if hi == math.inf else f" and at most {int(hi)}" if whole else f" and at most {hi:g}"
        kind = "a whole number" if whole else "a finite number"
        raise UserError(f"{flag} {value:g} is out of range: use {kind} {low}{high}")


def check_ratio(flag: str, value: float, what: str) -> None:
    """A fraction strictly between 0 and 1 (finite)."""
    if not (math.isfinite(value) and 0.0 < value < 1.0):
        raise UserError(f"{flag} {value:g} is out of range: use a number between 0 and 1 (exclusive), {what}")


def calib_checks(samples: int, seq_len: int, seed: int, batch_size: int) -> tuple[tuple[Any, ...], ...]:
    """The range checks of the calibration options every calibration command shares."""
    return (
        ("--samples", samples, 1, INT_MAX, True),
        ("--seq-len", seq_len, 2, INT_MAX, True),
        ("--seed", seed, 0, 2**63 - 1, True),
        ("--batch-size", batch_size, 1, INT_MAX, True),
    )


def data_file(spec: str | Path | None) -> Path | None:
    """A --calib/--data value that names an existing file (an input of the command), else None."""
    if spec is None:
        return None
    p = Path(str(spec)).expanduser()
    return p if p.is_file() else None


def guard(
    outputs: Iterable[tuple[Path | None, str]],
    model: Path | None = None,
    others: Iterable[Path | str | None] = (),
    overwrite: bool = False,
    with_model: bool = True,
    sidecars_in_model: bool = False,
) -> None:
    """Check every (output, "dir" | "file") against the command's inputs (MODEL, --base, --profile, data files)
    before any work, and create each output's temporary now (writer.guard_output). ``sidecars_in_model``: the
    sidecar files moecompress keeps in its folders (eval.json, ...) may go into MODEL only, not the other inputs."""
    inputs: list[Path | str | None] = list(others)
    homes = None
    if with_model:
        from ..core.checkpoint import resolve_model

        inputs.insert(0, resolve_model(model))
        homes = inputs[:1] if sidecars_in_model else None
    for out, kind in outputs:
        if out is not None:
            writer.guard_output(out, inputs, overwrite, kind=kind, homes=homes)


def write_json(obj: Any, path: Path | None, overwrite: bool = False) -> None:
    """JSON to ``path`` (atomically, through the temporary ``guard`` reserved), or to stdout when None.

    Non-finite numbers are written as null."""
    from ..core.manifest import json_safe

    text = json.dumps(json_safe(obj)[0], indent=2, allow_nan=False)
    if path is None:
        sys.stdout.write(text + "\n")
    else:
        writer.write_file(path, text + "\n", overwrite=overwrite)


# Calibration options shared by every command that runs a calibration pass (defaults are set per command).
CalibOpt = Annotated[
    str, typer.Option(help="Calibration data: built-in set (shakespeare, bible, python, austen, mixed) or .txt/.jsonl.")
]
SamplesOpt = Annotated[int, typer.Option(help="Number of calibration windows (at least 1).")]
SeqLenOpt = Annotated[int, typer.Option("--seq-len", help="Tokens per window (at least 2, at most the context).")]
SeedOpt = Annotated[int, typer.Option(help="Seed for window sampling (0 or more).")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Windows per forward batch (at least 1).")]


def _max_memory(value: str | None) -> str | None:
    """--max-memory callback: parse the size and set the process-wide limit (cleared when not given); bad text is
    one line on stderr, exit 2, before any work."""
    from ..core.limits import parse_size, set_memory_limit

    try:
        set_memory_limit(parse_size(value) if value is not None else None)
    except ValueError as err:
        _one_line(f"--max-memory {err}")
        raise typer.Exit(2) from None
    return value


MaxMemoryOpt = Annotated[
    str | None,
    typer.Option(
        "--max-memory",
        callback=_max_memory,
        help="Memory this command may use, e.g. 64GB or 512GiB (default: the machine's RAM / the GPU's memory). "
        "Per-expert state (Hessians, HEAPr's G) is held a chunk of experts at a time to stay under it, and the "
        "command refuses up front when even that is predicted not to fit (see `moecompress plan`).",
        show_default=False,
    ),
]
