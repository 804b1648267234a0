"""The LP measuring pass's codes, kept for the write pass: in memory, or spilled to files as they are made.

    cache = CodeCache(spill=True)          # spill=False: a plain in-memory mapping
    quantize_layer(..., packed=True, spill=cache.folder)   # spilled: each expert's rows go to files as made
    cache.put_layer(l, {width: PackedCodes, ...})   # measuring pass, layer by layer
    cache[(l, width)]                       # write pass: rows are read from the files as the pass uses them

Spilled, the codes' fields are :class:`~moecompress.quant.rowfile.RowFile` s (packed as written: bits / 8 bytes per
weight per width, gate/up codes shared by the options that have them stored once) in a temporary folder that is
removed when the cache is dropped: host memory holds only the expert row being written or read (not one layer's
codes at every width, ~17 bits per weight beside a 16-bit layer), and reading back gives the same bits, so the
probes and the write pass see what an in-memory cache (or quantizing again on the same inputs) would.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path

from .layer import PackedCodes, Width


class CodeCache(Mapping[tuple[int, Width], PackedCodes]):
    """{(layer, width): PackedCodes}, in memory or (``spill``) with their rows in files of a temporary folder
    (``folder``: where ``quantize_layer(spill=...)`` makes them)."""

    def __init__(self, spill: bool = False, parent: str | Path | None = None):
        self._mem: dict[tuple[int, Width], PackedCodes] = {}
        self.folder: Path | None = None
        if spill:
            self.folder = Path(tempfile.mkdtemp(prefix="moecompress-codes-", dir=parent))
            self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.folder), True)

    @property
    def spilled(self) -> bool:
        return self.folder is not None

    def put_layer(self, layer: int, codes: Mapping[Width, PackedCodes]) -> None:
        """Every width's codes of one layer (in the measuring pass, after the layer is quantized)."""
        self._mem.update({(layer, w): q for w, q in codes.items()})

    def __getitem__(self, key: tuple[int, Width]) -> PackedCodes:
        return self._mem[key]

    def __iter__(self) -> Iterator[tuple[int, Width]]:
        return iter(list(self._mem))

    def __len__(self) -> int:
        return len(self._mem)

    def close(self) -> None:
        """Drop the codes and remove the spill folder (also done when the cache is garbage-collected)."""
        self._mem = {}
        if self.folder is not None:
            self._cleanup()
