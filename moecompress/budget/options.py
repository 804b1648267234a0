"""The per-expert option menu of the byte-budget planner and the exact bytes of each option.

Every routed expert takes one option: removed, or kept at a channel width from ``FRACTIONS`` of its width (100%,
75%, 50%) and quantized at one of ``BITS`` (2, 3, 4, 8). Bytes use quant's own accounting
(``quant.rtn.quantized_nbytes``: int32-packed codes, one scale per group in the model dtype, the two-int64
``weight_shape``) with the group sizes the quantizer uses for that width (``quant.layer.expert_group_sizes``), so the
plan's bytes are the bytes the writer puts in the safetensors payload.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..quant.layer import expert_group_sizes
from ..quant.rtn import SUPPORTED_BITS, quantized_nbytes

FRACTIONS = (1.0, 0.75, 0.5)
BITS = SUPPORTED_BITS  # (2, 3, 4, 8)
REMOVE = "remove"


def cut_width(width: int, fraction: float) -> int:
    """Channels kept at ``fraction`` of ``width``: a multiple of 16 when the width is one (kernels want aligned
    widths), else a multiple of 8 (at least one multiple)."""
    m = 16 if width % 16 == 0 else 8 if width % 8 == 0 else 1
    return min(width, max(m, int(round(width * fraction / m)) * m))


@dataclass(frozen=True)
class Option:
    """One choice for one routed expert: ``kind`` "remove" or "keep" (``width`` channels at ``bits``)."""

    kind: str
    width: int = 0
    bits: int = 0
    fraction: float = 0.0

    @property
    def removed(self) -> bool:
        return self.kind == REMOVE

    def label(self) -> str:
        return "removed" if self.removed else f"{self.fraction:.0%}@{self.bits}b"


def menu(width: int, fractions: tuple[float, ...] = FRACTIONS, bits: tuple[int, ...] = BITS) -> list[Option]:
    """Option 0 removes the expert; then every distinct (width, bits), widest first."""
    out = [Option(REMOVE)]
    seen: set[int] = set()
    for f in fractions:
        w = cut_width(width, f)
        if w in seen:
            continue
        seen.add(w)
        out += [Option("keep", w, b, w / width) for b in bits]
    return out


def expert_bytes(hidden: int, width: int, bits: int, scale_bytes: int) -> int:
    """Bytes of one routed expert (gate, up [width, hidden], down [hidden, width]) packed at ``bits``."""
    g_h, g_i = expert_group_sizes(hidden, width)
    return 2 * quantized_nbytes(width, hidden, bits, g_h, scale_bytes) + quantized_nbytes(
        hidden, width, bits, g_i, scale_bytes
    )


def option_bytes(opt: Option, hidden: int, scale_bytes: int, router_row_bytes: int = 0) -> int:
    """Bytes an expert costs under ``opt``: nothing when removed (its router row goes too), else its packed
    projections and its router row."""
    if opt.removed:
        return 0
    return expert_bytes(hidden, opt.width, opt.bits, scale_bytes) + router_row_bytes
