"""`moecompress report`: render the HTML report from sidecar files. Registered by cli.main."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..core.errors import UserError
from ..core.progress import out_console
from ..core.writer import write_file
from .common import FileOverwriteOpt, guard, user_errors


@user_errors
def report(
    paths: Annotated[
        list[Path],
        typer.Argument(
            metavar="RUN_OR_OUTPUT_DIR",
            help="Run folders (profile -o), output folders (prune/merge/quantize/compress -o) or sidecar JSON files.",
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option(
            "-o",
            "--output",
            help="HTML file to write (default: FOLDER/report.html for one folder, else ./report.html). Never inside "
            "an input folder except that folder's own report.html, which is regenerated.",
        ),
    ] = None,
    title: Annotated[str | None, typer.Option(help="Page title (default: the model name).")] = None,
    overwrite: FileOverwriteOpt = False,
) -> None:
    """Render one self-contained HTML report (no network, no scripts) from the files other commands wrote.

    It never recomputes: summary, per-layer x per-expert heatmaps, what was removed/merged/quantized (one block per
    stage of the output's moecompress.json), a bytes-vs-KL Pareto plot when several runs are given, and warnings.
    A moecompress.json that is not a manifest this version reads is shown as "Unreadable manifest" with the reason.

    Examples:\n
      moecompress report runs/base\n
      moecompress report out/pruned out/merged out/quant -o compare.html
    """
    from ..report import REPORT_NAME, build_report

    for p in paths:
        if not p.exists():
            raise UserError(f"{p} does not exist: give a run folder, an output folder or a sidecar JSON file")
    if output is None:
        output = paths[0] / REPORT_NAME if len(paths) == 1 and paths[0].is_dir() else Path(REPORT_NAME)
    from ..report.sidecars import load_run

    # inputs: the folders and files given, and the profile runs their manifests point to
    profiles = [r.profile_path.parent for r in map(load_run, paths) if r.profile_path is not None]
    guard([(output, "file")], others=[*paths, *profiles], overwrite=overwrite, with_model=False)
    page = build_report(paths, title=title)
    write_file(output, page, overwrite=overwrite)
    out_console.print(f"report: {len(paths)} folder(s) -> {output} ({len(page):,} bytes)")


def register(app: typer.Typer) -> None:
    """Add the `report` command to the moecompress app."""
    app.command("report")(report)
