"""torch.distributed in five calls: who am I, what do I own, fill rows, sum, wait.

Under ``torchrun --nproc-per-node N moecompress ...`` every rank runs the same command. The process group is
created lazily, on the first collective, from torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT): NCCL for CUDA tensors when the job runs on a GPU (``use_device``), gloo for CPU tensors. Without
torchrun (no WORLD_SIZE, or WORLD_SIZE=1) every call is the single-process identity and torch.distributed is never
touched, so library code calls these unconditionally.

The contract for splitting per-item work (experts of a layer, say) across ranks:

    for e in dist.share(E):          # e = rank, rank + world, ...
        out[e] = fit(e)
    dist.fill_rows_(out, E)          # now every rank holds every row, bit for bit

Multi-node jobs use torchrun's own rendezvous flags (``--nnodes``, ``--rdzv-endpoint``); nothing here launches.
"""

from __future__ import annotations

import atexit
import datetime
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as td

from .errors import UserError

_device: torch.device | None = None  # the job's device, chosen before the first collective
_broken = False  # a collective failed because a peer left: the group cannot be torn down cleanly


class PeerLost(UserError):
    """A collective failed because another rank of the job failed or left.

    The process group is then unusable, and tearing it down (or leaving it to the interpreter's exit) can abort
    the process inside gloo ("terminate called without an active exception"), which would replace the one-line
    message's exit code 2 by a signal. The CLI therefore leaves such a process with ``os._exit`` right after the
    message (``cli.common.user_errors``).
    """


def _env_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def world() -> int:
    """Number of ranks in the job (1 without torchrun)."""
    if td.is_available() and td.is_initialized():
        return td.get_world_size()
    return _env_world()


def rank() -> int:
    """This process's rank, 0 .. world() - 1 (0 without torchrun)."""
    if td.is_available() and td.is_initialized():
        return td.get_rank()
    return int(os.environ.get("RANK", "0") or 0) if _env_world() > 1 else 0


def local_rank() -> int:
    """This process's rank on its machine (torchrun's LOCAL_RANK); selects the CUDA device."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0) if world() > 1 else 0


def is_main() -> bool:
    """True on the rank that prints and writes (rank 0)."""
    return rank() == 0


def share(n: int) -> range:
    """The items of ``range(n)`` this rank owns: ``range(rank, n, world)``."""
    return range(rank(), n, world())


def use_device(device: torch.device | str) -> torch.device:
    """Record the job's device; under torchrun a CUDA device becomes ``cuda:LOCAL_RANK`` (returned).

    Call before the first collective: the process group then gets NCCL for CUDA tensors (gloo stays the backend
    of CPU tensors). A no-op apart from the return value at world 1.
    """
    global _device
    device = torch.device(device)
    if device.type == "cuda" and world() > 1:
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    _device = device
    return device


def _timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get("MOECOMPRESS_DIST_TIMEOUT", "1800")))


def _group_ready() -> bool:
    """Create the process group on first use; False at world 1 (nothing to communicate)."""
    if _env_world() <= 1 and not (td.is_available() and td.is_initialized()):
        return False
    if not td.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if _device is not None and _device.type == "cuda" else "gloo"
        td.init_process_group(backend=backend, timeout=_timeout())
        atexit.register(shutdown)
    return td.get_world_size() > 1


@contextmanager
def _peers() -> Iterator[None]:
    """A collective whose peer failed or left (gloo: connection closed; a timeout) -> one line, exit 2 (UserError),
    not a traceback: the rank that failed printed its own message."""
    global _broken
    try:
        yield
    except RuntimeError as err:
        _broken = True
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        first = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". ")[0][:160]  # gloo: "[file:line] What. More."
        raise PeerLost(
            f"rank {rank()} of {world()}: another rank of this torchrun job failed or stopped ({first}); its own "
            "message says why"
        ) from None


def _wire(t: torch.Tensor) -> torch.Tensor:
    """A tensor on the device the backend talks through (the tensor's own, CPU under gloo)."""
    if t.device.type == "cuda" and "nccl" not in str(td.get_backend()):
        return t.cpu()
    return t


def fill_rows_(t: torch.Tensor, n: int) -> torch.Tensor:
    """Make every rank hold all ``n`` rows of ``t`` (dim 0) when row ``i`` is valid only on rank ``i % world``.

    Exact for every dtype (rows travel as bytes). Rows a rank does not own may hold anything before the call.
    Returns ``t``.
    """
    if n != t.shape[0]:
        raise ValueError(f"fill_rows_: tensor has {t.shape[0]} rows, expected {n}")
    if not _group_ready() or n == 0:
        return t
    w, r = td.get_world_size(), td.get_rank()
    per = -(-n // w)  # rows per rank, padded
    row_bytes = t[0].numel() * t.element_size()
    mine = _wire(t[r::w].contiguous()).reshape(-1).view(torch.uint8)  # [rows_r * row_bytes]
    send = torch.zeros(per * row_bytes, dtype=torch.uint8, device=mine.device)
    send[: mine.numel()] = mine
    parts = [torch.empty_like(send) for _ in range(w)]
    with _peers():
        td.all_gather(parts, send)
    for src, part in enumerate(parts):
        rows = len(range(src, n, w))
        if src == r or rows == 0:
            continue
        got = part[: rows * row_bytes].view(t.dtype).reshape((rows,) + tuple(t.shape[1:]))
        t[src::w] = got.to(t.device)
    return t


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all ranks, in place (the identity at world 1). Returns ``t``.

    The sum's order is fixed for a given world size, so repeated runs agree; it is not the single-process order.
    Half-precision and bool tensors on gloo are summed in float32 / int64 and cast back.
    """
    if not _group_ready():
        return t
    wire = _wire(t)
    if wire.device.type == "cpu" and wire.dtype in (torch.bfloat16, torch.float16, torch.bool):
        wide = wire.to(torch.float32 if wire.is_floating_point() else torch.int64)
        with _peers():
            td.all_reduce(wide)
        wire = wide.to(t.dtype)
    else:
        wire = wire.contiguous()
        with _peers():
            td.all_reduce(wire)
    if wire.data_ptr() != t.data_ptr():
        t.copy_(wire)
    return t


def broadcast_(t: torch.Tensor, src: int) -> torch.Tensor:
    """Copy rank ``src``'s ``t`` into ``t`` on every rank (exact for every dtype; the identity at world 1)."""
    if not _group_ready():
        return t
    wire = _wire(t.contiguous()).reshape(-1).view(torch.uint8)
    with _peers():
        td.broadcast(wire, src)
    if wire.data_ptr() != t.data_ptr():
        t.copy_(wire.view(t.dtype).reshape(t.shape))
    return t


def barrier() -> None:
    """Wait for every rank (a no-op at world 1)."""
    if not _group_ready():
        return
    with _peers():
        if _device is not None and _device.type == "cuda":
            td.barrier(device_ids=[_device.index or 0])
        else:
            td.barrier()


def broken() -> bool:
    """True once a collective failed because a peer left (see ``PeerLost``)."""
    return _broken


def shutdown() -> None:
    """Destroy the process group if this module created one (end of a command); a broken one is left alone."""
    if td.is_available() and td.is_initialized() and not _broken:
        td.destroy_process_group()
