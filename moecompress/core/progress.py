"""Consoles and progress bars: results go to stdout (``out_console``); progress, warnings and errors to stderr
(``console``; progress bars are quiet with MOECOMPRESS_QUIET=1). Under torchrun only rank 0 shows progress and
results; errors and warnings print on every rank."""

from __future__ import annotations

import os

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from . import dist

console = Console(stderr=True)
out_console = Console(soft_wrap=True, quiet=not dist.is_main())  # result lines stay whole when piped


def progress_bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=os.environ.get("MOECOMPRESS_QUIET") == "1" or not dist.is_main(),
        transient=False,
    )
