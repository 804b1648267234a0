"""The LP measuring pass's codes, kept for the write pass: in memory, or spilled to one file per layer.

    cache = CodeCache(spill=True)          # spill=False: a plain in-memory mapping
    cache.put_layer(l, {width: PackedCodes, ...})   # measuring pass, layer by layer
    cache[(l, width)]                       # write pass: the layer's file is read when the pass reaches it

Spilled, host memory holds one layer's codes at a time (the one being written or read back); the files (packed as
written: bits / 8 bytes per weight per width, gate/up codes shared by the options that have them stored once) live
in a temporary folder that is removed when the cache is dropped. Reading back gives the same tensors bit for bit,
so the write pass writes what an in-memory cache (or quantizing again on the same inputs) would.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from .layer import PackedCodes, Width

_FIELDS = ("gate_up", "gate_up_s", "down", "down_s")


class CodeCache(Mapping[tuple[int, Width], PackedCodes]):
    """{(layer, width): PackedCodes}, in memory or (``spill``) one torch file per layer in a temporary folder."""

    def __init__(self, spill: bool = False, parent: str | Path | None = None):
        self._mem: dict[tuple[int, Width], PackedCodes] = {}
        self._keys: list[tuple[int, Width]] = []
        self._dir: Path | None = None
        if spill:
            self._dir = Path(tempfile.mkdtemp(prefix="moecompress-codes-", dir=parent))
            self._cleanup = weakref.finalize(self, shutil.rmtree, str(self._dir), True)
        self._layer: int | None = None  # the spilled layer held in _mem

    @property
    def spilled(self) -> bool:
        return self._dir is not None

    def put_layer(self, layer: int, codes: Mapping[Width, PackedCodes]) -> None:
        """Every width's codes of one layer (in the measuring pass, after the layer is quantized)."""
        self._keys.extend((layer, w) for w in codes)
        if self._dir is None:
            self._mem.update({(layer, w): q for w, q in codes.items()})
            return
        rows = [(w, q.bits, q.down_bits, q.g_h, q.g_i, q.H, q.I, *(getattr(q, f) for f in _FIELDS))
                for w, q in codes.items()]  # fmt: skip
        torch.save(rows, self._dir / f"layer{layer}.pt")  # shared gate/up storages are written once

    def _read(self, layer: int) -> None:
        assert self._dir is not None
        rows = torch.load(self._dir / f"layer{layer}.pt", weights_only=True)
        self._mem = {(layer, w): PackedCodes(b, db, gh, gi, gu, gus, dn, dns, H, I)
                     for w, b, db, gh, gi, H, I, gu, gus, dn, dns in rows}  # fmt: skip
        self._layer = layer

    def __getitem__(self, key: tuple[int, Width]) -> PackedCodes:
        if self._dir is not None and key[0] != self._layer:
            if key not in self._keys:
                raise KeyError(key)
            self._mem = {}  # the previous layer's codes go before the next are read
            self._read(key[0])
        return self._mem[key]

    def __iter__(self) -> Iterator[tuple[int, Width]]:
        return iter(list(self._keys))

    def __len__(self) -> int:
        return len(self._keys)

    def close(self) -> None:
        """Drop the codes and remove the spill folder (also done when the cache is garbage-collected)."""
        self._mem, self._layer = {}, None
        if self._dir is not None:
            self._cleanup()
