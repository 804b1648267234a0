"""Write a Hugging Face checkpoint folder atomically: shards + index + config + tokenizer + moecompress.json.

Everything goes to a temporary sibling folder first and is renamed into place only when complete,
so an interrupted run never leaves a half-written output and never touches the input model.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from . import __version__
from .errors import UserError

DEFAULT_SHARD_BYTES = 2 * 1024**3


def check_output(out: str | Path, model_dir: str | Path | None, overwrite: bool) -> Path:
    """Validate an output folder before any work: not the input, not inside it, not existing unless allowed."""
    o = Path(out).expanduser().resolve()
    if model_dir is not None:
        m = Path(model_dir).expanduser().resolve()
        if o == m or m in o.parents:
            raise UserError(f"output {o} is the input model folder or inside it: choose another -o/--output")
        if o in m.parents:
            raise UserError(f"output {o} contains the input model folder: choose another -o/--output")
    if o.exists() and not overwrite:
        raise UserError(f"output {o} already exists: remove it or pass --overwrite")
    if o.exists() and not o.is_dir():
        raise UserError(f"output {o} exists and is not a folder: choose another -o/--output")
    return o


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it replaces ``out``, on error it is removed."""
    o = Path(out).expanduser().resolve()
    o.parent.mkdir(parents=True, exist_ok=True)
    tmp = o.parent / f".{o.name}.tmp-{os.getpid()}-{int(time.time() * 1000)}"
    tmp.mkdir()
    try:
        yield tmp
        if o.exists():
            if not overwrite:
                raise UserError(f"output {o} appeared while writing: remove it or pass --overwrite")
            trash = o.parent / f".{o.name}.old-{os.getpid()}"
            o.rename(trash)
            tmp.rename(o)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(o)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_shards(
    folder: Path, tensors: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int = DEFAULT_SHARD_BYTES
) -> dict[str, Any]:
    """Write tensors as model-0000x-of-0000n.safetensors + model.safetensors.index.json; returns the index."""
    shard: dict[str, torch.Tensor] = {}
    size = 0
    written: list[tuple[str, list[str]]] = []
    total = 0

    def flush() -> None:
        nonlocal shard, size
        if not shard:
            return
        name = f"shard-{len(written):05d}.tmp"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        written.append((name, list(shard)))
        shard, size = {}, 0

    seen: set[str] = set()
    for key, t in tensors:
        if key in seen:
            raise ValueError(f"tensor {key} written twice")
        seen.add(key)
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
        shard[key] = t.detach().to("cpu").contiguous()
        size += nbytes
        total += nbytes
    flush()
    n = len(written)
    weight_map: dict[str, str] = {}
    for i, (tmpname, keys) in enumerate(written):
        final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        (folder / tmpname).rename(folder / final)
        weight_map.update({k: final for k in keys})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return index


def write_checkpoint(
    out: str | Path,
    tensors: Iterable[tuple[str, torch.Tensor]],
    config: dict[str, Any],
    side_files: Iterable[Path],
    manifest: dict[str, Any],
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    extra_json: dict[str, Any] | None = None,
    started: float | None = None,
    report_inputs: Sequence[Path] = (),
    report: bool = True,
) -> Path:
    """Write a complete HF folder atomically.

    ``manifest`` becomes moecompress.json with tool, version, the real ``bytes_after`` and (given ``started``,
    a time.time() value) ``elapsed_s`` added; it is written after the tensors, so a generator may still fill it
    in while it yields. ``report.html`` is rendered into the folder from its sidecars (plus ``report_inputs``,
    e.g. the profile run folder) unless ``report`` is False.
    """
    o = Path(out).expanduser().resolve()
    with atomic_dir(o, overwrite=overwrite) as tmp:
        write_shards(tmp, tensors, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for f in side_files:
            shutil.copy2(f, tmp / f.name)
        for name, obj in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
        manifest["bytes_after"] = dir_bytes(tmp)
        if started is not None:
            manifest["elapsed_s"] = round(time.time() - started, 2)
        full = {"tool": "moecompress", "tool_version": __version__, **manifest}
        (tmp / "moecompress.json").write_text(json.dumps(full, indent=2) + "\n")
        if report:
            from .report import write_report

            write_report(tmp, [Path(p) for p in report_inputs])
    return o


def dir_bytes(folder: str | Path) -> int:
    """Bytes of the safetensors weight files in a folder."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))
