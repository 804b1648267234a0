"""Large state held in memory, or past a size in a temporary file whose pages leave the process between uses.

    h = Held.empty((T, k, H), limit=n_bytes)   # torch.empty, or mapped from an unlinked temporary file
    h.t[rows] = ...; h.drop()                  # after each block of work: the file's pages leave this process's memory
    p = park(t); del t; ...; t = unpark(p)     # state that waits unread (past PARK_BYTES) waits in a file

A spilled tensor is a shared memory map of an unlinked temporary file (its disk space reserved up front: a full disk
keeps the tensor in memory instead of failing later); ``drop`` (madvise DONTNEED) takes its pages off the process
(they stay in the kernel's page cache, written back to the file: a later read faults them back with the values
written). The values and the arithmetic are the same either way, bit for bit; the process's resident memory holds a
block, not the tensor. Used by merge's measured choice (``merge/held.py``) and by the engine for the recorded mixer
outputs that wait through a layer's transforms (``core/engine.py`` ``Replay``).
"""

from __future__ import annotations

import math
import mmap
import os
import tempfile

import torch

# a Held tensor is in memory up to this size, past it in a temporary file (default limit)
HELD_BYTES = 128 << 20
# state a search does not read until later (another clustering's start, the best choice so far) waits in a temporary
# file past this size (``park``): one write and one read of it, no page faults while the search works
PARK_BYTES = 16 << 20


class Held:
    """A tensor ``t``: in memory, or (on the CPU, past ``limit`` bytes) a shared memory map of an unlinked temporary
    file, whose resident pages ``drop`` gives back (no-op in memory)."""

    def __init__(self, t: torch.Tensor, mm: mmap.mmap | None = None):
        self.t, self._mm = t, mm

    @classmethod
    def empty(
        cls, shape: tuple[int, ...], device: torch.device | str = "cpu", limit: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Held:  # fmt: skip
        """An unset tensor of ``shape`` (in a file when on the CPU and over ``limit``, default ``HELD_BYTES``; in
        memory when the temporary folder has no room for it: its blocks are reserved before it is mapped, so a full
        disk never faults a later write)."""
        n = math.prod(shape)
        size = n * torch.empty((), dtype=dtype).element_size()
        mm = _file_map(size) if _in_file(size, device, limit) else None
        if mm is None:
            return cls(torch.empty(shape, device=device, dtype=dtype))
        return cls(torch.frombuffer(mm, dtype=dtype, count=n).view(shape), mm)

    @classmethod
    def of(cls, t: torch.Tensor, limit: int | None = None, block: int = 1 << 25) -> Held:
        """``t``'s values held: ``t`` itself, or a copy in a file (when ``empty`` would put it in one) written
        ``block`` bytes of rows at a time, each block's pages dropped after it."""
        if t.dim() == 0 or not _in_file(t.nbytes, t.device, limit):
            return cls(t)
        h = cls.empty(tuple(t.shape), t.device, limit, t.dtype)
        if not h.spilled:  # (no room for the file)
            return cls(t)
        step = _rows_step(t, block)
        for r0 in range(0, t.shape[0], step):
            h.t[r0 : r0 + step] = t[r0 : r0 + step]
            h.drop()
        return h

    @property
    def spilled(self) -> bool:
        return self._mm is not None

    def drop(self) -> None:
        """The file's pages leave this process's resident memory (their values are kept in the file)."""
        if self._mm is not None:
            self._mm.madvise(mmap.MADV_DONTNEED)


def _file_map(size: int) -> mmap.mmap | None:
    """A shared read-write map of a new unlinked temporary file of ``size`` bytes, its blocks reserved; None when
    the temporary folder has no room for it (or cannot hold or map a file)."""
    try:
        fd, path = tempfile.mkstemp(prefix="moecompress-held-")
    except OSError:
        return None
    try:
        os.unlink(path)  # the file lives as long as the mapping
        os.posix_fallocate(fd, 0, size)
        return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError:
        return None
    finally:
        os.close(fd)


def _in_file(nbytes: int, device: torch.device | str, limit: int | None) -> bool:
    """Whether ``nbytes`` on ``device`` go to a file under ``limit`` (default ``HELD_BYTES``): on the CPU, past it."""
    return torch.device(device).type == "cpu" and nbytes > (HELD_BYTES if limit is None else limit)


def _rows_step(t: torch.Tensor, block: int) -> int:
    """Rows of ``t`` in about ``block`` bytes (at least one)."""
    return max(1, block // max(1, t[:1].nbytes))


def parks(nbytes: int) -> bool:
    """Whether ``nbytes`` of state waiting unread go to a temporary file (``park``)."""
    return nbytes > PARK_BYTES


def park(t: torch.Tensor, limit: int | None = None) -> Held:
    """``t``'s values while they wait unread: past ``limit`` bytes (default ``PARK_BYTES``; on the CPU) a copy in a
    temporary file whose pages left this process (``Held.of``; the caller drops ``t``), else ``t`` itself.
    ``unpark`` gives them back."""
    return Held.of(t, PARK_BYTES if limit is None else limit)


def unpark(h: Held | torch.Tensor, block: int = 1 << 25) -> torch.Tensor:
    """``park``'s values in memory: ``h.t`` when it is there, else a copy made ``block`` bytes of rows at a time, each
    block's file pages dropped after it (the file goes when ``h`` does). The same values, bit for bit. A tensor
    (never parked) is returned as it is."""
    if isinstance(h, torch.Tensor):
        return h
    if not h.spilled:
        return h.t
    src = h.t
    out = torch.empty_like(src)
    step = _rows_step(src, block)
    for r0 in range(0, src.shape[0], step):
        out[r0 : r0 + step] = src[r0 : r0 + step]
        h.drop()
    return out
