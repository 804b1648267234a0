"""The per-expert option menu of the byte-budget planner and the exact bytes of each option.

Every routed expert takes one option: removed, or kept at a channel width from ``FRACTIONS`` of its width (100%,
75%, 50%) and quantized at one of quantize's per-projection options (``quant.plan.OPTIONS``: gate/up at one of
2/3/4/8 bits and down_proj at its own, 16 pairs; (b, b) is every projection at b bits). At full width the menu is
exactly the menu of `quantize --plan lp --granularity expert`, so the joint plan's feasible set contains quantize's
per-projection LP plan. Bytes use quant's own accounting (``quant.rtn.quantized_nbytes``: int32-packed codes, one
scale per group in the model dtype, the two-int64 ``weight_shape``) with the group sizes the quantizer uses for that
width (``quant.layer.expert_group_sizes``), so the plan's bytes are the bytes the writer puts in the safetensors
payload (at full width: ``quant.plan.Layout.expert_bytes`` of the same pair, tested).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..quant.layer import Width, expert_group_sizes, split_width
from ..quant.plan import OPTIONS
from ..quant.rtn import SUPPORTED_BITS, quantized_nbytes

FRACTIONS = (1.0, 0.75, 0.5)
BITS = SUPPORTED_BITS  # (2, 3, 4, 8)
PAIRS: tuple[Width, ...] = OPTIONS  # (gate/up bits, down bits), quantize's per-projection LP menu
REMOVE = "remove"


def cut_width(width: int, fraction: float) -> int:
    """Channels kept at ``fraction`` of ``width``: a multiple of 16 when the width is one (kernels want aligned
    widths), else a multiple of 8 (at least one multiple)."""
    m = 16 if width % 16 == 0 else 8 if width % 8 == 0 else 1
    return min(width, max(m, int(round(width * fraction / m)) * m))


@dataclass(frozen=True)
class Option:
    """One choice for one routed expert: ``kind`` "remove" or "keep" (``width`` channels, gate/up at ``bits``,
    down_proj at ``down_bits``, None: at ``bits`` too)."""

    kind: str
    width: int = 0
    bits: int = 0
    fraction: float = 0.0
    down_bits: int | None = None

    @property
    def removed(self) -> bool:
        return self.kind == REMOVE

    @property
    def pair(self) -> tuple[int, int]:
        """``(gate/up bits, down bits)``."""
        return self.bits, self.bits if self.down_bits is None else self.down_bits

    @property
    def uniform(self) -> bool:
        """Every projection at one width (what a servable layout may use)."""
        return self.pair[0] == self.pair[1]

    @property
    def quant_width(self) -> Width:
        """The width as quantize names it: ``b`` for every projection at b bits, else ``(gate/up, down)``."""
        return self.bits if self.uniform else self.pair

    @property
    def average_bits(self) -> float:
        """Payload bits per weight (gate/up are two thirds of an expert's weights)."""
        bg, bd = self.pair
        return bg if bg == bd else round((2 * bg + bd) / 3, 4)

    def label(self) -> str:
        if self.removed:
            return "removed"
        bg, bd = self.pair
        return f"{self.fraction:.0%}@{bg}b" if bg == bd else f"{self.fraction:.0%}@{bg}/{bd}b"


def menu(width: int, fractions: tuple[float, ...] = FRACTIONS, options: tuple[Width, ...] = PAIRS) -> list[Option]:
    """Option 0 removes the expert; then every distinct (width, option), widest first, options in the given order
    (an int b is every projection at b bits, a pair is (gate/up bits, down bits))."""
    out = [Option(REMOVE)]
    seen: set[int] = set()
    for f in fractions:
        w = cut_width(width, f)
        if w in seen:
            continue
        seen.add(w)
        for o in options:
            bg, bd = split_width(o)
            out.append(Option("keep", w, bg, w / width, None if bd == bg else bd))
    return out


def expert_bytes(hidden: int, width: int, bits: Width, scale_bytes: int) -> int:
    """Bytes of one routed expert (gate, up [width, hidden] at the gate/up bits, down [hidden, width] at the down
    bits) packed at ``bits`` (an int for every projection, or ``(gate/up bits, down bits)``)."""
    bg, bd = split_width(bits)
    g_h, g_i = expert_group_sizes(hidden, width)
    return 2 * quantized_nbytes(width, hidden, bg, g_h, scale_bytes) + quantized_nbytes(
        hidden, width, bd, g_i, scale_bytes
    )


def option_bytes(opt: Option, hidden: int, scale_bytes: int, router_row_bytes: int = 0) -> int:
    """Bytes an expert costs under ``opt``: nothing when removed (its router row goes too), else its packed
    projections and its router row."""
    if opt.removed:
        return 0
    return expert_bytes(hidden, opt.width, opt.pair, scale_bytes) + router_row_bytes
