"""Write outputs safely: one guard for every file and folder a command writes, then atomic writes.

Every output (a model or run folder, ``--json``, ``report -o``) goes through :func:`guard_output` before any
compute: it is refused when it lies inside (or contains) an input of the command, when it exists and
``--overwrite`` was not given, and when ``--overwrite`` would replace something moecompress did not write.
The guard also creates the output's temporary sibling ``.NAME.tmp-PID-MS`` right away, so a location that cannot
be written fails in one line before the work. The result is written into that temporary and renamed into place
only when complete, so an interrupted run never leaves a half-written output and never touches an input.
Temporaries of processes that no longer run are removed by the next run into the same folder.
Under torchrun only rank 0 writes: the other ranks check the outputs like rank 0 but reserve nothing, and what they
would write goes to a private scratch folder that is removed (``atomic_dir``) or nowhere (``write_file``).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..version import __version__
from . import dist
from .errors import UserError

DEFAULT_SHARD_BYTES = 2 * 1024**3
# Output written by the layer stream is flushed into a shard at the end of a decoder layer once this much is
# buffered (a --max-memory makes it at most a sixteenth of that): between layers the writer holds at most this,
# not up to DEFAULT_SHARD_BYTES (1.7 Qwen3-30B layers on top of every op's peak).
LAYER_FLUSH_BYTES = 256 * 1024**2
MANIFEST = "moecompress.json"
# Files moecompress writes into a folder it made earlier (eval --json, report): they may be (re)written there even
# though that folder is an input of the command, e.g. `eval out/pruned --json out/pruned/eval.json`.
OWN_SIDECARS = ("eval.json", "eval_base.json", "report.html")
# ".NAME.tmp-PID-MS" (being written) and ".NAME.old-PID" (an output being replaced); PID is the writer's process.
TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?:tmp-(?P<pid>\d+)-\d+|old-(?P<oldpid>\d+))$")
TEMP_HELP = "Written into a hidden .NAME.tmp-PID-* beside it and renamed into place when complete."
# errno values that mean "this location cannot take the output": reported in one line, never a traceback.
WRITE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG, errno.ENOTDIR, errno.EEXIST}
)


@dataclass
class _Reserved:
    """A temporary created by guard_output for ``out``, and the parent folders it had to create."""

    out: Path
    tmp: Path
    kind: str
    created: list[Path] = field(default_factory=list)


_RESERVED: dict[Path, _Reserved] = {}
_DONE: list[Path] = []


def _abs(p: str | Path) -> Path:
    return Path(p).expanduser().resolve()


def is_moecompress_folder(folder: Path) -> bool:
    """A folder moecompress wrote: its manifest, a profile run's profile.json or a --plan-only bit_plan.json."""
    return any((folder / n).is_file() for n in (MANIFEST, "profile.json", "bit_plan.json"))


def _own_sidecar(o: Path, inp: Path) -> bool:
    """``o`` is a sidecar moecompress keeps in the folder ``inp`` it wrote (report.html: any folder of sidecars)."""
    if o.parent != inp or o.name not in OWN_SIDECARS:
        return False
    if o.name == "report.html":
        return any((inp / n).is_file() for n in (MANIFEST, "profile.json", "bit_plan.json", *OWN_SIDECARS[:2]))
    return is_moecompress_folder(inp)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True
    return True


def clean_stale_temps(parent: Path) -> list[Path]:
    """Remove ``.NAME.tmp-PID-*`` / ``.NAME.old-PID`` left in ``parent`` by processes that no longer run."""
    removed: list[Path] = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = TEMP_RE.match(p.name)
        if not m or _pid_alive(int(m["pid"] or m["oldpid"])):
            continue
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        except OSError:
            continue
        removed.append(p)
    if removed:
        names = ", ".join(p.name for p in removed)
        print(
            f"removed {len(removed)} stale temporary item(s) of interrupted runs in {parent}: {names}", file=sys.stderr
        )
    return removed


def _new_temp(o: Path, kind: str) -> Path:
    tmp = o.parent / f".{o.name}.tmp-{os.getpid()}-{int(time.time() * 1000)}"
    if kind == "dir":
        tmp.mkdir()
    else:
        tmp.touch(exist_ok=False)
    return tmp


def _cannot_write(o: Path, err: OSError) -> UserError:
    where = f" ({err.filename})" if err.filename and Path(err.filename) != o else ""
    reason = err.strerror or str(err)
    if err.errno in (errno.ENOTDIR, errno.EEXIST):
        reason = "a parent of it is a file, not a folder"
    return UserError(f"cannot write {o}: {reason}{where}; nothing was written")


def guard_output(
    out: str | Path,
    inputs: Iterable[str | Path | None] = (),
    overwrite: bool = False,
    kind: str = "dir",
    reserve: bool = True,
    homes: Iterable[str | Path] | None = None,
) -> Path:
    """The one check every output goes through, before any work; returns the absolute output path.

    ``kind`` is "dir" (a model or run folder) or "file" (JSON, HTML). Refused (UserError, nothing written) when
    the output is an input, lies inside one or contains one (symlinks resolved), when it exists and not
    ``overwrite``, and when ``overwrite`` would replace a folder moecompress did not write (an empty folder is fine)
    or a folder with a file. The only outputs allowed inside an input folder are the sidecars moecompress writes
    into its own folders (OWN_SIDECARS; only into ``homes`` when given, e.g. eval's model, never its --base); an
    existing report.html there is regenerated without ``overwrite``.
    With ``reserve``, stale temporaries of dead processes beside the output are removed, missing parents are
    created and the temporary is created now, so an unwritable location fails here, before any compute.
    """
    given = Path(out).expanduser()
    o = _abs(given)
    regenerate = False
    home = None if homes is None else {_abs(h) for h in homes}
    for raw in inputs:
        if raw is None:
            continue
        i = _abs(raw)
        if (home is None or i in home) and _own_sidecar(o, i):
            regenerate = o.name == "report.html"
            continue
        if o == i:
            raise UserError(f"output {given} is the input {raw}: choose another location")
        if i in o.parents:
            raise UserError(f"output {given} is inside the input {raw}: choose another location")
        if o in i.parents:
            raise UserError(f"output {given} contains the input {raw}: choose another location")
    if o.exists():
        if kind == "dir" and not o.is_dir():
            raise UserError(f"output {given} exists and is a file, not a folder: choose another location")
        if kind == "file" and o.is_dir():
            raise UserError(f"output {given} is a folder: give a file name")
        if not overwrite and not regenerate:
            raise UserError(f"output {given} already exists: remove it, choose another location or pass --overwrite")
        if kind == "dir" and any(o.iterdir()) and not is_moecompress_folder(o):
            raise UserError(
                f"output {given} is not a folder moecompress wrote (no {MANIFEST} or profile.json): --overwrite only "
                "replaces moecompress outputs or empty folders; choose another location"
            )
    if reserve and o not in _RESERVED and dist.is_main():
        _reserve(o, kind)
    return o


def _reserve(o: Path, kind: str) -> None:
    created: list[Path] = []
    missing = [p for p in (o.parent, *o.parent.parents) if not p.exists()]
    try:
        for p in reversed(missing):
            p.mkdir()
            created.append(p)
        clean_stale_temps(o.parent)
        tmp = _new_temp(o, kind)
    except OSError as err:
        for p in reversed(created):
            p.rmdir()
        raise _cannot_write(o, err) from None
    _RESERVED[o] = _Reserved(o, tmp, kind, created)


def take_temp(o: Path, kind: str) -> Path:
    """The temporary reserved for ``o`` by guard_output, or a new one (library calls without the CLI)."""
    r = _RESERVED.get(o)
    if r is not None and r.tmp.exists():
        return r.tmp
    o.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(o.parent)
    tmp = _new_temp(o, kind)
    _RESERVED[o] = _Reserved(o, tmp, kind)
    return tmp


def finish_temp(o: Path, tmp: Path, overwrite: bool) -> None:
    """Rename ``tmp`` to ``o``, replacing ``o`` only as guard_output allows."""
    if o.exists() or o.is_symlink():
        if not overwrite and not (o.name == "report.html" and _own_sidecar(o, o.parent)):
            raise UserError(f"output {o} appeared while writing: remove it or pass --overwrite")
        if o.is_dir():
            if any(o.iterdir()) and not is_moecompress_folder(o):
                raise UserError(f"output {o} is not a folder moecompress wrote: it was left as it is")
            trash = o.parent / f".{o.name}.old-{os.getpid()}"
            o.rename(trash)
            tmp.rename(o)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, o)
    else:
        tmp.rename(o)
    _RESERVED.pop(o, None)
    _DONE.append(o)


def release_reserved() -> list[Path]:
    """Remove every temporary not renamed into place (and parents created for it); returns the outputs written."""
    for r in list(_RESERVED.values()):
        if r.tmp.is_dir() and not r.tmp.is_symlink():
            shutil.rmtree(r.tmp, ignore_errors=True)
        else:
            r.tmp.unlink(missing_ok=True)
        for p in reversed(r.created):
            try:
                p.rmdir()
            except OSError:
                break
    _RESERVED.clear()
    done = list(_DONE)
    _DONE.clear()
    return done


def check_output(out: str | Path, model_dir: str | Path | None, overwrite: bool) -> Path:
    """Validate an output folder against the input model (library entry points); see guard_output."""
    return guard_output(out, [model_dir], overwrite, kind="dir", reserve=False)


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield the temporary folder beside ``out``; on success it replaces ``out``, on error it is removed.
    Under torchrun, ranks other than 0 get a private scratch folder that is removed (rank 0 writes)."""
    if not dist.is_main():
        scratch = Path(tempfile.mkdtemp(prefix=f"moecompress-rank{dist.rank()}-"))
        try:
            yield scratch
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        dist.barrier()  # (see below)
        return
    o = _abs(out)
    tmp = take_temp(o, "dir")
    try:
        yield tmp
        dist.barrier()  # under torchrun: every rank has checked the output before it appears
        finish_temp(o, tmp, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_file(out: str | Path, text: str, overwrite: bool = False) -> Path:
    """Write a text file atomically through its temporary (reserved by guard_output when the CLI runs); under
    torchrun only rank 0 writes."""
    o = _abs(out)
    if not dist.is_main():
        dist.barrier()  # (see below)
        return o
    tmp = take_temp(o, "file")
    try:
        tmp.write_text(text, encoding="utf-8")
        dist.barrier()  # under torchrun: every rank has checked the output before it appears
        finish_temp(o, tmp, overwrite)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return o


OS_ERROR_RE = re.compile(r"os error (\d+)")


def as_os_error(err: BaseException, path: str | Path | None = None) -> OSError | None:
    """``err`` as an OSError: itself, or a safetensors I/O error ("... (os error 28)") rebuilt as one."""
    if isinstance(err, OSError):
        return err
    m = OS_ERROR_RE.search(str(err)) if type(err).__name__ == "SafetensorError" else None
    if m is None:
        return None
    n = int(m.group(1))
    return OSError(n, os.strerror(n), None if path is None else str(path))


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors.save_file whose I/O failures (disk full, read-only) raise OSError like every other write."""
    try:
        save_file(tensors, str(path), metadata=metadata)
        os.chmod(path, _FILE_MODE)  # safetensors creates files 0600; give them the mode every other file gets
    except Exception as err:
        os_err = as_os_error(err, path)
        if os_err is None:
            raise
        raise os_err from None


def _umask_file_mode() -> int:
    """0666 less the process umask: the mode ``open(path, "w")`` gives a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _umask_file_mode()


def layer_flush_bytes() -> int:
    """What the stream's writer may hold between two layers: LAYER_FLUSH_BYTES, or a sixteenth of --max-memory."""
    from .limits import memory_limit

    limit = memory_limit()
    return LAYER_FLUSH_BYTES if limit is None else min(LAYER_FLUSH_BYTES, limit // 16)


class ShardWriter:
    """Tensors pushed one at a time into model-0000x-of-0000n.safetensors shards (a shard is flushed when the
    next tensor would pass ``max_shard_bytes``, or at a boundary() once ``bound`` bytes are buffered), then
    ``close()`` names them and writes the index."""

    def __init__(self, folder: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.folder, self.max_shard_bytes = folder, max_shard_bytes
        self._shard: dict[str, torch.Tensor | Callable[[], torch.Tensor]] = {}
        self._size = 0
        self._written: list[tuple[str, list[str]]] = []
        self._seen: set[str] = set()
        self.total = 0  # tensor bytes
        self.params = 0

    def _flush(self) -> None:
        if not self._shard:
            return
        name = f"shard-{len(self._written):05d}.tmp"
        tensors = {k: _on_cpu(v() if callable(v) else v) for k, v in self._shard.items()}
        save_tensors(tensors, self.folder / name, metadata={"format": "pt"})
        del tensors
        self._written.append((name, list(self._shard)))
        self._shard, self._size = {}, 0

    @property
    def buffered(self) -> int:
        """Tensor bytes held for the shard not written yet."""
        return self._size

    def boundary(self, bound: int) -> bool:
        """A point where a shard may end (a decoder layer is complete): write the buffered tensors when they
        reach ``bound`` bytes; returns whether a shard was written."""
        if not self._shard or self._size < bound:
            return False
        self._flush()
        return True

    def add(self, key: str, t: torch.Tensor, load: Callable[[], torch.Tensor] | None = None) -> None:
        """Buffer ``t`` for the current shard; with ``load`` only its size is taken now and ``load()`` (which must
        return the same tensor again, e.g. read from the input checkpoint) gives the data when the shard is written,
        so nothing of it is held meanwhile (the globals a layer pass writes with its first layer: the embedding and
        lm_head, views of a safetensors memory map whose read pages would stay resident through the pass)."""
        if key in self._seen:
            raise ValueError(f"tensor {key} written twice")
        self._seen.add(key)
        nbytes = t.numel() * t.element_size()
        if self._shard and self._size + nbytes > self.max_shard_bytes:
            self._flush()
        self._shard[key] = _on_cpu(t) if load is None else _same_as(key, t, load)
        self._size += nbytes
        self.total += nbytes
        self.params += t.numel()

    def close(self) -> dict[str, Any]:
        self._flush()
        n = len(self._written)
        weight_map: dict[str, str] = {}
        for i, (tmpname, keys) in enumerate(self._written):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.folder / tmpname).rename(self.folder / final)
            weight_map.update({k: final for k in keys})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return index


def _on_cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous()


def _same_as(key: str, t: torch.Tensor, load: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """``load`` checked to give a tensor of ``t``'s shape and dtype."""
    shape, dtype = tuple(t.shape), t.dtype

    def loaded() -> torch.Tensor:
        got = load()
        if tuple(got.shape) != shape or got.dtype != dtype:
            raise ValueError(f"tensor {key} read again as {tuple(got.shape)} {got.dtype}, not {shape} {dtype}")
        return got

    return loaded


def write_shards(
    folder: Path, tensors: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int = DEFAULT_SHARD_BYTES
) -> dict[str, Any]:
    """Write tensors as model-0000x-of-0000n.safetensors + model.safetensors.index.json; returns the index."""
    w = ShardWriter(folder, max_shard_bytes)
    for key, t in tensors:
        w.add(key, t)
    return w.close()


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
            from ..report import write_report

            write_report(tmp, [Path(p) for p in report_inputs])
    return o


def dir_bytes(folder: str | Path) -> int:
    """Bytes of the safetensors weight files in a folder."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))
