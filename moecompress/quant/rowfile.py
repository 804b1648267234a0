"""A tensor whose rows live in a file: written and read one row (or a slice of one) at a time.

    t = RowFile((E, R, C), torch.int32, folder)   # an unset [E, R, C] tensor in a new file of ``folder``
    t[e] = row                                    # [R, C] written at e's offset (pwrite)
    t[e]; t[e, a:b]                               # a new tensor read from the file (pread): the row, rows a..b-1

What the LP measuring pass's codes use past their memory bound (quant/layer.py ``PackedCodes``, quant/codecache.py):
host memory holds only the row being written or read (the file's pages are the kernel's page cache, not the
process's memory), and a read gives back the bytes written, so the codes are the same bit for bit. The file is
removed when the object is garbage-collected (or its folder removed).
"""

from __future__ import annotations

import math
import os
import tempfile
import weakref
from pathlib import Path

import torch


def _close(fd: int, path: str) -> None:
    os.close(fd)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class RowFile:
    """``shape [n, ...]`` of ``dtype`` in a temporary file of ``folder``; indexing a row (``t[e]``, ``t[e, a:b]``
    along dim 1) reads it, ``t[e] = row`` writes it. Rows never written read as zeros."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, folder: str | Path):
        self.shape, self.dtype = torch.Size(shape), dtype
        self._row = self.shape[1:]
        self._item = torch.empty((), dtype=dtype).element_size()
        self._row_bytes = math.prod(self._row) * self._item
        fd, path = tempfile.mkstemp(prefix="rows-", dir=folder)
        self._fd, self.path = fd, path
        self._closer = weakref.finalize(self, _close, fd, path)

    def numel(self) -> int:
        return math.prod(self.shape)

    def element_size(self) -> int:
        return self._item

    def dim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def _offset(self, e: int) -> int:
        if not -self.shape[0] <= e < self.shape[0]:
            raise IndexError(f"row {e} of {self.shape[0]}")
        return (e % self.shape[0]) * self._row_bytes

    def __setitem__(self, e: int, value: torch.Tensor) -> None:
        if not isinstance(e, int) or value.shape != self._row or value.dtype != self.dtype:
            raise ValueError(f"RowFile rows are set whole: [{e}] = {tuple(value.shape)} {value.dtype}")
        raw = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        off, done = self._offset(e), 0
        while done < raw.nbytes:
            done += os.pwrite(self._fd, raw[done:], off + done)

    def __getitem__(self, key: int | tuple[int, slice]) -> torch.Tensor:
        e, sub = (key, None) if isinstance(key, int) else key
        off, shape = self._offset(e), self._row
        if sub is not None:  # rows a..b-1 of the row's first dim: one contiguous range of its bytes
            a, b, step = sub.indices(self._row[0])
            if step != 1:
                raise IndexError("RowFile reads a contiguous slice")
            per = self._row_bytes // max(self._row[0], 1)
            off, shape = off + a * per, torch.Size((max(b - a, 0), *self._row[1:]))
        out = torch.empty(shape, dtype=self.dtype)
        raw = out.reshape(-1).view(torch.uint8).numpy()
        done = 0
        while done < raw.nbytes:
            n = os.preadv(self._fd, [raw[done:]], off + done)
            if n == 0:  # past the end of what was written: unset rows are zeros
                raw[done:] = 0
                break
            done += n
        return out
