"""The measured choice's large state held in memory, or past a size in a temporary file (``core.held.Held``).

    h = Held.empty((T, k, H), limit=state_limit(layer_bytes))   # torch.empty, or mapped from an unlinked temp file
    h.t[rows] = ...; h.drop()          # after each block of work: the file's pages leave this process's memory

merge/choose.py holds two tensors that grow with the fit + measure tokens Tc: the cached original expert outputs
[Tc, k+1, H] (``HeldOutputs``) and the merged layer's routed outputs [Tc, k, H] (``_Routed.outs``): 906 + 805 MB at
Qwen3-30B dims and 12,288 tokens, 1,057 + 940 MB on the DeepSeek-V3-dims slice at 4,096. Each stays in memory up to
``state_limit`` (the larger of ``STATE_FLOOR_BYTES`` and ``STATE_LAYER_FRACTION`` of the layer's routed experts in the
checkpoint dtype, as prune's search cache) and past it is a shared memory map of a temporary file, worked on a row block
at a time; ``drop`` (madvise DONTNEED) after each block takes its pages off the process (they stay in the kernel's
page cache, written back to the file: a later read faults them back with the values written). Smaller state of the
same pass (the router fit's [H+1, H+1] float64 factor, the starts' missed outputs) goes to a file past
``core.held.HELD_BYTES``.
The values and the arithmetic are the same either way, so the choice and the written bytes are the same bit for bit;
the process's resident memory holds a block, not the tensor. The page faults cost CPU time (at H 512 with every
state in files, about a quarter more per layer): hence the limits.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ..core.held import Held
from ..core.stream import libc_function, release_freed
from ..prune.order import ExpertOutputs

# the [Tc, ., H] state (cache, routed outputs) stays in memory up to the larger of these (``state_limit``)
STATE_FLOOR_BYTES = 256 << 20
STATE_LAYER_FRACTION = 0.5


def state_limit(layer_bytes: int) -> int:
    """Bytes of one [Tc, ., H] state tensor held in memory for a layer of ``layer_bytes`` routed-expert bytes."""
    return max(STATE_FLOOR_BYTES, int(STATE_LAYER_FRACTION * layer_bytes))


class HeldOutputs(ExpertOutputs):
    """``prune.order.ExpertOutputs`` (the same pairs, the same calls, so the same values) whose cache [T, c, H] is
    ``Held``: past ``core.held.HELD_BYTES`` in a file, its pages dropped after each expert's fill, each ``get`` and each
    expert computed for a miss (``drop``; ``LayerFit`` drops after its own reads of ``cache``)."""

    _held: Held | None = None
    limit: int | None = None  # the cache's ``Held.empty`` limit (set before ``ExpertOutputs.__init__`` runs)

    def __init__(self, *args: Any, limit: int | None = None, **kwargs: Any):
        self.limit = limit
        super().__init__(*args, **kwargs)

    @property  # type: ignore[override]
    def cache(self) -> torch.Tensor | None:
        return None if self._held is None else self._held.t

    @cache.setter
    def cache(self, t: torch.Tensor | None) -> None:
        # ExpertOutputs.__init__ sets an unset [T, c, H] torch.empty (its pages never touched): replaced by a Held one
        self._held = None if t is None else Held.empty(tuple(t.shape), t.device, self.limit)

    def drop(self) -> None:
        if self._held is not None:
            self._held.drop()

    def apply(self, e: int, xr: torch.Tensor) -> torch.Tensor:
        self.drop()  # the previous expert's filled rows (or a get's reads) leave before this one's are computed
        return super().apply(e, xr)

    def get(self, rows: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        try:
            return super().get(rows, idx)
        finally:
            self.drop()


# glibc mallopt: allocations of at least this many bytes are mapped (and unmapped when freed) in ``mapped_allocations``
M_MMAP_THRESHOLD, M_TRIM_THRESHOLD = -3, -1
MAPPED_BYTES = 1 << 20
DYNAMIC_MAX_BYTES = 32 << 20  # glibc's largest dynamic mmap threshold on 64-bit: where it stands after large frees


@contextmanager
def mapped_allocations(on: bool = True) -> Iterator[None]:
    """Inside: the C heap maps every allocation of ``MAPPED_BYTES`` or more (glibc ``mallopt``; a no-op elsewhere or
    when not ``on``), so a freed tensor's pages leave the process at once. By default glibc raises its mmap threshold
    to the largest block freed (up to 32 MiB): a search's many blocks just under 32 MiB (row blocks, [c, I] solves)
    then go to the heap, whose freed pages stay resident; on a 4-expert proxy of the DeepSeek-V3-dims slice that held
    0.33 GB at the trials' peak (2.83 -> 2.51 GB) for 12% more CPU (page faults: 215 -> 241 s). After: the threshold
    set to ``DYNAMIC_MAX_BYTES``, where the default one stands after such blocks (mallopt turns the adjustment off)."""
    mallopt = libc_function("mallopt")
    if not on or mallopt is None:
        yield
        return
    mallopt(M_MMAP_THRESHOLD, MAPPED_BYTES)
    mallopt(M_TRIM_THRESHOLD, MAPPED_BYTES)  # a freed top of the heap past this goes back at once
    release_freed()  # the heap's free pages from before (later large allocations are mapped, not taken from it)
    try:
        yield
    finally:
        mallopt(M_MMAP_THRESHOLD, DYNAMIC_MAX_BYTES)
        mallopt(M_TRIM_THRESHOLD, 2 * DYNAMIC_MAX_BYTES)  # (glibc's dynamic trim threshold: twice the mmap one)
