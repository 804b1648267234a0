"""Memory limits: the user's --max-memory, this machine's RAM and a GPU's memory.

    nbytes = parse_size("64GB")          # 64_000_000_000 (GB = 10^9, GiB = 2^30)
    set_memory_limit(nbytes)             # the CLI does this once per command
    memory_limit()                       # -> 64_000_000_000, or None when --max-memory was not given

Operations that keep per-expert state (Hessians, activation caches) read ``memory_limit()`` to size their chunks;
the up-front check (``Job.prepare``) compares the predicted peak with it, the host RAM and the GPU memory.
"""

from __future__ import annotations

import math
import os
import re

import torch

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")

_limit: int | None = None


def parse_size(text: str) -> int:
    """``"64GB"`` / ``"512MiB"`` / ``"1.5e9"`` -> bytes (GB, MB, KB, TB are powers of 10; GiB, MiB, ... of 2).

    Raises ValueError on text that is not a positive size.
    """
    m = _SIZE.match(str(text))
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a size: use a number with an optional unit, e.g. 64GB, 512MiB or 1.5e9")
    value = float(m.group(1)) * _UNITS[unit]
    if not math.isfinite(value) or value < 1 or value >= 2**63:
        raise ValueError(f"{text!r} is out of range: use a size of at least 1 byte and below 8 EiB")
    return int(value)


def format_size(nbytes: float) -> str:
    """Bytes -> a short human size (powers of 2: ``1.5 GiB``)."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover - the loop returns


def set_memory_limit(nbytes: int | None) -> None:
    """Set (or clear with None) the user's --max-memory for this process."""
    global _limit
    if nbytes is not None and (not isinstance(nbytes, int) or nbytes < 1):
        raise ValueError(f"memory limit must be a positive whole number of bytes, got {nbytes!r}")
    _limit = nbytes


def memory_limit() -> int | None:
    """The user's --max-memory in bytes, or None when it was not given."""
    return _limit


def _meminfo(field: str) -> int | None:
    """One ``/proc/meminfo`` field in bytes, or None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def host_memory_bytes() -> int:
    """Total RAM of this machine in bytes (``/proc/meminfo`` MemTotal, else ``os.sysconf``); 0 when unknown."""
    total = _meminfo("MemTotal")
    if total is not None:
        return total
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, OSError, ValueError):
        return 0


def host_available_bytes() -> int:
    """RAM available to a new allocation now (``/proc/meminfo`` MemAvailable), else the total."""
    available = _meminfo("MemAvailable")
    return available if available is not None else host_memory_bytes()


def gpu_memory_bytes(device: torch.device | str | int | None = None) -> int:
    """Total memory of a CUDA device in bytes; 0 for a CPU device or when CUDA is not available."""
    dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device or "cuda")
    if dev.type != "cuda" or not torch.cuda.is_available():
        return 0
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    return int(torch.cuda.get_device_properties(index).total_memory)


STATE_MEMORY_FRACTION = 0.25  # of --max-memory (else of the free memory) for per-expert state held at once


def expert_chunk(
    num_experts: int, per_expert: int, device: torch.device | None = None, limit: int | None = None
) -> int:
    """How many experts' per-expert state (``per_expert`` bytes each: HEAPr's G, merge's per-expert tensors) is held
    at once: a quarter of ``limit`` (default ``--max-memory``, else the free memory of ``device``: MemAvailable on
    the CPU, free GPU memory on CUDA) divided by ``per_expert``; at least 1, at most ``num_experts``."""
    if limit is None:
        limit = memory_limit()
    if limit is None:
        if device is not None and device.type == "cuda":
            limit = int(torch.cuda.mem_get_info(device)[0])
        else:
            limit = host_available_bytes()
    return int(max(1, min(num_experts, int(limit * STATE_MEMORY_FRACTION) // max(1, per_expert))))
