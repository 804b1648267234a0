"""Per-MoE-layer work of `moecompress quantize`: routed-token Hessians, per-expert quantization at every candidate
width, and the measured block-output error err[e, b] (pure tensor code, no I/O).

For expert e with routed tokens X_e, top-k router weights p_e(x) (as the block applies them) and unweighted output
f_e(x), the MoE block output changes by p_e(x) (f_e^q(x) - f_e(x)) when only expert e is quantized (routing is
unchanged: the router is never quantized), so

    err[e, b] = sum_{x in X_e} p_e(x)^2 || f_e^{q,b}(x) - f_e(x) ||^2 / T        (T: all calibration tokens)

is exactly the mean squared MoE-block output error with only expert e quantized at b bits.

GPTQ Hessians per expert come from that expert's routed tokens only: H_gu[e] = X_e^T X_e for gate/up (one GPTQ run
on the fused [2I, H] matrix: rows are independent given H). Sequential (default): gate/up are quantized first and
down_proj's Hessian is built from the *quantized* gate/up outputs, h_q = act(Wg_q x) * (Wu_q x), at each candidate
width (so down_proj's rounding compensates the error already made upstream); otherwise H_down[e] = h^T h of the
original weights. Work runs on the device of the capture, one expert at a time (weights are upcast per
expert). Hessians exist only for a chunk of experts at a time (``hessian_chunk``: a quarter of --max-memory, else
of the device's free memory, and at most a quarter of the layer's routed weights), built from the captured layer
inputs, which are re-read per chunk; the gate/up factorization is computed once per expert and reused across
widths (and down_proj's, when it does not depend on the width), and only the codes and scales of each width are
kept (on the CPU; with ``packed``, each expert packed as it is quantized: bits / 8 bytes per weight), never
dequantized copies of the layer. Under torchrun, each rank quantizes its share
of the experts (``core.dist.share``) and the rows are exchanged afterwards (``core.dist.fill_rows_``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moecompress.core import dist
from moecompress.core.experts import fused_hidden
from moecompress.quant.gptq import (
    DEFAULT_CLIP,
    PreparedHessian,
    gptq_quantize,
    gptq_quantize_batched,
    prepare_hessian,
    prepare_hessian_batched,
)
from moecompress.quant.pack import pack_int32, packed_cols, unpack_int32
from moecompress.quant.rowfile import RowFile
from moecompress.quant.rtn import DEFAULT_CLIP_GRID, dequantize, group_size_for, rtn_quantize


@dataclass
class GPTQOptions:
    """Choices of the GPTQ pipeline (defaults are the measured best, see bench/quant_bench.py)."""

    actorder: bool = True  # static activation ordering (plain group layout)
    sequential: bool = True  # down_proj's Hessian from the quantized gate/up outputs
    clip: str = DEFAULT_CLIP  # per-group scale search: none | mse | hmse
    damp: float = 0.03  # x mean Hessian diagonal (0.01 before the scale refinement; 0.03 measured better with it)
    # the written codes are computed in a second streamed pass whose layer inputs come from the already quantized
    # earlier layers (at their planned widths); the first pass (errors, plan) propagates the original weights.
    # Off by default: measured worse at 3 bits on both bench models and within noise at 4 (reports/quant_bench.md)
    propagate: bool = False
    # Hessians weight each routed token by its router weight squared (p^2 x x^T): the expert's error enters the
    # block output scaled by p, so this is the block-output error GPTQ should minimize
    weighted: bool = True
    clip_grid: tuple[float, ...] = DEFAULT_CLIP_GRID  # shrink factors of the scale search
    # after GPTQ, each row's group scales are refitted by least squares to its codes under the full Hessian
    # (measured with damp 0.03, bench/quant_bench.py: lower KL on the built-in model at 4 and 3 bits)
    refine: bool = True

    def describe(self) -> dict:
        return {
            "router_weighted_hessians": self.weighted,
            "actorder": self.actorder, "sequential": self.sequential, "clip": self.clip, "damp": self.damp,
            "propagate_quantized": self.propagate, "refine_scales": self.refine,
        }  # fmt: skip


@dataclass
class LayerCapture:
    """Routed inputs of one MoE layer, kept batch by batch, with per-expert token counts and max |output|.

    Hessians are not held for the whole layer: :meth:`hessians` builds them for a chunk of experts at a time from
    the kept inputs (on ``device``), so per-expert state is bounded by the chunk (``hessian_chunk``)."""

    num_experts: int
    hidden: int  # H
    width: int  # I
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    with_down: bool = True  # the layer will need H_down of the original weights (not when sequential)
    weighted: bool = True  # Hessians weight tokens by their router weight squared
    batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (x, idx, w)
    counts: torch.Tensor = field(init=False)  # [E]
    max_abs: torch.Tensor = field(init=False)  # [E] max |down_proj output| (super experts)
    tokens: int = 0

    def __post_init__(self) -> None:
        E = self.num_experts
        self.counts = torch.zeros(E, dtype=torch.long)
        self.max_abs = torch.zeros(E, dtype=torch.float64)

    def observer(self) -> Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]:
        """Hook for ``experts.routed_forward``: counts one batch's routed tokens and max |output| per expert (call
        after ``add_batch``)."""

        def observe(e: int, token_idx: torch.Tensor, pos: torch.Tensor, h: torch.Tensor, f: torch.Tensor) -> None:
            self.counts[e] += token_idx.numel()
            self.max_abs[e] = max(float(self.max_abs[e]), float(f.detach().abs().max()))

        return observe

    def add_batch(self, hidden: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> None:
        """Keep one batch's MoE inputs ``hidden [T, H]``, ``idx [T, k]``, ``weights [T, k]`` (float32, CPU)."""
        self.batches.append((hidden.detach().float().cpu(), idx.detach().cpu(), weights.detach().float().cpu()))
        self.tokens += hidden.shape[0]

    def hessians(
        self,
        experts: Sequence[int],
        gate_up: torch.Tensor | None = None,
        act: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(H_gu [n, H, H], H_down [n, I, I] or None)`` of the ``experts`` (on ``device``), summed batch by batch
        over their routed tokens, each token weighted by its router weight squared when ``weighted``:
        H_gu = sum p^2 x x^T; given ``gate_up [E, 2I, H]`` and ``act``, H_down = sum p^2 h h^T of the hidden
        ``h = act(W_gate x) * (W_up x)`` of those weights."""
        n, dev = len(experts), self.device
        h_gu = torch.zeros(n, self.hidden, self.hidden, device=dev)
        h_dn = torch.zeros(n, self.width, self.width, device=dev) if gate_up is not None else None
        if h_dn is not None and act is None:
            raise ValueError("H_down needs the layer's activation")
        for x_all, idx, w_all in self.batches:
            x_all, idx, w_all = x_all.to(dev), idx.to(dev), w_all.to(dev)  # one transfer per batch and chunk
            for i, e in enumerate(experts):
                tok, pos = torch.where(idx == e)
                if not tok.numel():
                    continue
                x = x_all[tok]  # [m, H]
                p = w_all[tok, pos].unsqueeze(-1) if self.weighted else 1.0  # [m, 1]
                xp = x * p
                h_gu[i] += xp.T @ xp
                if h_dn is not None:
                    hf = fused_hidden(x, gate_up[e].to(dev).float(), act) * p  # [m, I]
                    h_dn[i] += hf.T @ hf
        return h_gu, h_dn

    def routed(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(X_e [n, H], p_e [n])``: the routed inputs of expert ``e`` and their router weights, on ``device``.
        The rows are gathered straight into ``X_e`` (no per-batch copies joined afterwards: at 16 experts, top-8,
        an expert's X_e is about half the calibration tokens' [T, H], so that join was one more such copy)."""
        hits = []
        for x, idx, w in self.batches:
            tok, pos = torch.where(idx == e)
            hits.append((x, tok, w[tok, pos]))
        if not hits:
            return torch.zeros(0, self.hidden, device=self.device), torch.zeros(0, device=self.device)
        xe = torch.empty(sum(t.numel() for _, t, _ in hits), self.hidden, dtype=hits[0][0].dtype)
        r = 0
        for x, tok, _ in hits:
            torch.index_select(x, 0, tok, out=xe[r : r + tok.numel()])
            r += tok.numel()
        return xe.to(self.device), torch.cat([p for _, _, p in hits]).to(self.device)


HESSIAN_MEMORY_FRACTION = 0.25  # of --max-memory, else of the free memory of the job's device
HESSIAN_LAYER_FRACTION = 0.25  # of the layer's routed weights (as held): Hessians of a chunk stay below this


def hessian_chunk(
    num_experts: int,
    hidden: int,
    width: int,
    with_down: bool,
    device: torch.device,
    limit: int | None = None,
    layer_bytes: int | None = None,
) -> int:
    """How many experts' Hessians are held at once: a quarter of ``limit`` (default ``--max-memory``, else the
    free memory of ``device``: MemAvailable on the CPU, free GPU memory on CUDA) and, given ``layer_bytes`` (the
    layer's routed weights as held), at most a quarter of those, divided by one expert's Hessians, ``(H^2 + I^2)
    x 4`` bytes (``I^2`` only ``with_down``; the factorizations are made one expert at a time); at least 1, at
    most ``num_experts``. Small chunks cost nothing on the CPU (every expert's Hessian is summed from the same
    batches either way); on a GPU each chunk moves the captured inputs to the device once more."""
    per = _hessian_bytes(hidden, width, with_down)
    return int(max(1, min(num_experts, _hessian_budget(device, limit, layer_bytes) // per)))


def _hessian_bytes(hidden: int, width: int, with_down: bool) -> int:
    """One expert's float32 Hessians: gate/up's [H, H] and, ``with_down``, down's [I, I]."""
    return 4 * (hidden * hidden + (width * width if with_down else 0))


def _device_limit(device: torch.device, limit: int | None) -> int:
    """``limit``, else ``--max-memory``, else the free memory of ``device`` (MemAvailable on the CPU)."""
    from ..core.limits import host_available_bytes, memory_limit

    if limit is None:
        limit = memory_limit()
    if limit is None:
        limit = int(torch.cuda.mem_get_info(device)[0]) if device.type == "cuda" else host_available_bytes()
    return limit


def _hessian_budget(device: torch.device, limit: int | None, layer_bytes: int | None) -> float:
    """Bytes a chunk's Hessians may take (:func:`hessian_chunk`)."""
    budget = _device_limit(device, limit) * HESSIAN_MEMORY_FRACTION
    if layer_bytes is not None:
        budget = min(budget, layer_bytes * HESSIAN_LAYER_FRACTION)
    return budget


GPTQ_BATCHED_ENV = "MOECOMPRESS_GPTQ_BATCHED"  # "1": batched GPTQ even where a batch is 1, "0": expert by expert
# CPU: the column loop's block of a batch, [batch, R, 128] float32, stays within this (cache): measured on one core,
# batches of 3 experts at H 512 cut GPTQ's CPU time by 20-35%; at H 2048 (R 1536; 3 MiB gives batches of 3 there),
# with the column-major loop 14% faster for 6 experts; the whole Qwen3-30B layer quantize 565 -> 526 CPU s, peak RSS
# 2.81 -> 2.55 GB (reports/scale_bench.ops13i.*); at DeepSeek-V3's H 7168 still one expert per call (not measured)
GPTQ_CPU_BLOCK_BYTES = 3 << 20
# CUDA: a batch's working memory (factors, weight copies) stays within this share of the layer's routed weights as
# held, so the device peak keeps issue 13's bound (2.5x the layer + the activation cache). On an H200, the Qwen3-30B
# slice with batches of a whole chunk (18) peaked at 3.88 GB of GPU memory, over the bound's 3.0 GB (1.83 GB expert by
# expert; reports/gpu_check.bigops.json): 0.5 gives batches of 6 there
GPTQ_CUDA_LAYER_FRACTION = 0.5


def gptq_batched(device: torch.device) -> bool | None:
    """Whether GPTQ runs a batch of experts per call (:func:`moecompress.quant.gptq.gptq_quantize_batched`):
    ``$MOECOMPRESS_GPTQ_BATCHED`` 1 (always, even one expert per call) or 0 (never) when set; else None: on CUDA,
    and on the CPU where :func:`gptq_batch` gives more than one expert per batch (the same codes either way)."""
    env = os.environ.get(GPTQ_BATCHED_ENV, "").strip().lower()
    if env in ("1", "true", "yes", "on"):
        return True
    if env in ("0", "false", "no", "off"):
        return False
    return None


def gptq_batch(
    num_experts: int,
    hidden: int,
    width: int,
    with_down: bool,
    device: torch.device,
    limit: int | None = None,
    layer_bytes: int | None = None,
) -> tuple[int, int]:
    """``(chunk, batch)`` of the batched GPTQ: Hessians held for ``chunk`` experts, ``batch`` of them per batched
    call. One expert of a batch holds, besides its Hessians, its factors (``H^2``, and ``I^2`` for down_proj) and
    a few float32 copies of its weights (~``4 x 3IH``): ``work`` bytes. On CUDA the chunk is :func:`hessian_chunk`'s
    and the batches take at most a quarter of ``limit`` (default ``--max-memory``, else free GPU memory) and, given
    ``layer_bytes``, ``GPTQ_CUDA_LAYER_FRACTION`` of the layer. On the
    CPU the chunk is the batch, sized so that ``batch x (Hessians + work)`` stays within the per-expert path's
    peak (a chunk's Hessians plus one expert's work): the host peak is not raised; and so that the column loop's
    block ``[batch, R, 128]`` stays within ``GPTQ_CPU_BLOCK_BYTES`` (wider batches were slower on the CPU)."""
    per = _hessian_bytes(hidden, width, with_down)
    work = 4 * (hidden * hidden + 2 * width * width + 12 * width * hidden)
    chunk = hessian_chunk(num_experts, hidden, width, with_down, device, limit, layer_bytes)
    if device.type == "cuda":
        batch = int(_device_limit(device, limit) * HESSIAN_MEMORY_FRACTION // work)
        if layer_bytes is not None:
            batch = min(batch, int(layer_bytes * GPTQ_CUDA_LAYER_FRACTION // work))
        return chunk, int(max(1, min(chunk, batch)))
    budget = min(_hessian_budget(device, limit, layer_bytes), chunk * per)
    batch = min(num_experts, (budget + work) // (per + work), GPTQ_CPU_BLOCK_BYTES // (512 * max(2 * width, hidden)))
    return int(max(1, batch)), int(max(1, batch))


def expert_group_size(hidden: int, width: int) -> int:
    """One group size for all routed-expert projections (gate/up read H columns, down reads I): transformers and
    vLLM apply one scheme to a fused experts module. 128 when it divides both H and I (every real MoE model)."""
    return group_size_for(math.gcd(hidden, width))


def expert_group_sizes(hidden: int, width: int) -> tuple[int, int]:
    """``(g_h, g_i)``: group sizes of gate/up (H columns) and down (I columns). One shared size (above) unless it
    would be degenerate (< 8 columns per scale, e.g. H 64 / I 43 share no divisor): then each projection gets its
    own rule (two schemes in the config, still one per projection kind)."""
    g = expert_group_size(hidden, width)
    if g >= 8:
        return g, g
    return group_size_for(hidden), group_size_for(width)


Width = int | tuple[int, int]  # every projection at one width, or (gate/up bits, down bits)


def split_width(w: Width) -> tuple[int, int]:
    """``(gate/up bits, down bits)`` of a width or a per-projection option."""
    if isinstance(w, tuple):
        return int(w[0]), int(w[1])
    return int(w), int(w)


@dataclass
class QuantizedExperts:
    """Codes and scales of one layer's routed experts at one width (fused over experts)."""

    bits: int
    gate_up_q: torch.Tensor  # [E, 2I, H] int8
    gate_up_s: torch.Tensor  # [E, 2I, H / g_h]
    down_q: torch.Tensor  # [E, H, I] int8
    down_s: torch.Tensor  # [E, H, I / g_i]
    g_h: int
    g_i: int
    down_bits: int | None = None  # down_proj's width when it differs from gate/up's (a per-projection option)

    @property
    def dbits(self) -> int:
        """down_proj's width."""
        return self.bits if self.down_bits is None else self.down_bits

    def dequantized(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gate_up [E, 2I, H], down [E, H, I])`` as the loader will see them."""
        return dequantize(self.gate_up_q, self.gate_up_s, self.g_h, dtype), dequantize(
            self.down_q, self.down_s, self.g_i, dtype
        )

    def dequantized_expert(self, e: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gate_up [2I, H], down [H, I])`` of expert ``e`` as the loader will see them."""
        return dequantize(self.gate_up_q[e], self.gate_up_s[e], self.g_h, dtype), dequantize(
            self.down_q[e], self.down_s[e], self.g_i, dtype
        )


class PackedCodes:
    """One layer's routed-expert codes at one width, packed as they are written (int32 words, ``bits`` per code,
    compressed-tensors pack-quantized rows): ``bits / 8`` bytes per weight instead of int8 codes' one byte.
    Packing is row-wise, so an expert's gate rows, up rows and down rows are slices. What ``quantize_layer(...,
    packed=True)`` fills expert by expert (no int8 copy of the layer) and the measuring pass of an LP plan keeps
    for the write pass."""

    def __init__(
        self,
        bits: int,
        down_bits: int,
        g_h: int,
        g_i: int,
        gate_up: torch.Tensor,  # [E, 2I, words] int32
        gate_up_s: torch.Tensor,  # [E, 2I, H / g_h]
        down: torch.Tensor,  # [E, H, words'] int32
        down_s: torch.Tensor,  # [E, H, I / g_i]
        hidden: int,
        width: int,
    ):
        self.bits, self.down_bits, self.g_h, self.g_i = bits, down_bits, g_h, g_i
        self.gate_up, self.gate_up_s, self.down, self.down_s = gate_up, gate_up_s, down, down_s
        self.H, self.I = hidden, width

    @classmethod
    def empty(
        cls,
        E: int,
        hidden: int,
        width: int,
        bits: int,
        down_bits: int,
        g_h: int,
        g_i: int,
        scale_dtype: torch.dtype,
        gate_up: tuple[torch.Tensor, torch.Tensor] | None = None,
        folder: str | Path | None = None,
    ) -> PackedCodes:
        """Unset codes of ``E`` experts (``gate_up``: packed gate/up codes and scales to share, else new ones);
        with ``folder``, each field a :class:`RowFile` there (rows written and read one expert at a time)."""
        H, I = hidden, width

        def new(*shape: int, dtype: torch.dtype) -> Any:
            return torch.empty(*shape, dtype=dtype) if folder is None else RowFile(shape, dtype, folder)

        gu = gate_up or (
            new(E, 2 * I, packed_cols(H, bits), dtype=torch.int32),
            new(E, 2 * I, H // g_h, dtype=scale_dtype),
        )
        dn = new(E, H, packed_cols(I, down_bits), dtype=torch.int32)
        return cls(bits, down_bits, g_h, g_i, *gu, dn, new(E, H, I // g_i, dtype=scale_dtype), H, I)

    @classmethod
    def of(cls, qe: QuantizedExperts, gate_up: torch.Tensor | None = None) -> PackedCodes:
        """``qe`` packed (``gate_up``: its gate/up codes already packed, e.g. shared by per-projection options)."""
        H, I = qe.down_q.shape[-2], qe.down_q.shape[-1]
        gu = pack_int32(qe.gate_up_q, qe.bits) if gate_up is None else gate_up  # [E, 2I, words]
        return cls(
            qe.bits, qe.dbits, qe.g_h, qe.g_i, gu, qe.gate_up_s, pack_int32(qe.down_q, qe.dbits), qe.down_s, H, I
        )

    @property
    def dbits(self) -> int:
        """down_proj's width."""
        return self.down_bits

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.gate_up, self.gate_up_s, self.down, self.down_s))

    @staticmethod
    def estimate(num_weights: int, widths: Sequence[Width]) -> int:
        """Bytes of ``num_weights`` expert weights (2/3 gate/up, 1/3 down) packed at every width of ``widths``
        (gate/up codes once per gate/up width; scales not counted)."""
        pairs = [split_width(w) for w in widths]
        gu = sum(-(-num_weights * 2 * b // 24) for b in dict.fromkeys(b for b, _ in pairs))
        return gu + sum(-(-num_weights * b // 24) for _, b in pairs)

    def dequantized_expert(self, e: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gate_up [2I, H], down [H, I])`` of expert ``e`` as the loader will see them."""
        return self.weight(e, 0, dtype), self.weight(e, 1, dtype)

    def weight(self, e: int, which: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Expert ``e``'s gate_up [2I, H] (``which`` 0) or down [H, I] (1) dequantized (unpacked where it is)."""
        if which == 0:
            return dequantize(unpack_int32(self.gate_up[e], self.bits, self.H), self.gate_up_s[e], self.g_h, dtype)
        return dequantize(unpack_int32(self.down[e], self.down_bits, self.I), self.down_s[e], self.g_i, dtype)


def _expert_out(gu: torch.Tensor, dn: torch.Tensor, act: Callable, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(h [n, I], f [n, H])`` of one expert (fused gate/up ``gu [2I, H]``) through the one expert kernel."""
    h = fused_hidden(x, gu, act)  # [n, I]
    return h, nn.functional.linear(h, dn)  # [n, H]


def _output_err(
    hq: torch.Tensor, dn_q: torch.Tensor, refs: list[torch.Tensor | None], k: int, p: torch.Tensor, last: bool
) -> float:
    """``sum_x p(x)^2 ||f_q(x) - f(x)||^2`` (float64) of one expert: ``hq [n, I]`` the hidden of its quantized
    gate/up, ``dn_q [H, I]`` its quantized down_proj, ``refs[k] [n, H]`` the original outputs (dropped from
    ``refs`` once used when ``last``), ``p [n]`` the router weights. Formed in place (one [n, H] float32 and one
    float64 temporary: ``(hq dn_q^T - ref) p``, then its float64 copy squared in place): the values and the sum of
    ``((linear(hq, dn_q) - ref) * p).double().pow(2).sum()``, which held two more (the difference and the squares;
    at 16 experts, top-8, n is about half the calibration tokens)."""
    d = nn.functional.linear(hq, dn_q)  # [n, H]
    d.sub_(refs[k])
    if last:
        refs[k] = None
    d.mul_(p.unsqueeze(-1))
    dd = d.double()
    del d
    return dd.pow_(2).sum().item()


@torch.no_grad()
def quantize_layer(
    gate_up: torch.Tensor,  # [E, 2I, H] (any dtype/device; upcast per expert)
    down: torch.Tensor,  # [E, H, I]
    act: Callable[[torch.Tensor], torch.Tensor],
    widths: Sequence[Width],
    method: str,
    cap: LayerCapture | None,
    min_tokens: int,
    scale_dtype: torch.dtype,
    weight_dtype: torch.dtype = torch.float32,
    opts: GPTQOptions | None = None,
    with_err: bool = True,
    expert_widths: Sequence[Width] | None = None,
    chunk: int | None = None,
    packed: bool = False,
    batched: bool | None = None,
    spill: str | Path | None = None,
) -> tuple[dict[Width, Any], list[str], torch.Tensor | None]:
    """Quantize every routed expert of a layer at every width in ``widths``.

    A width is an int (every projection at it) or a per-projection option ``(gate/up bits, down bits)``; gate/up
    is quantized once per distinct gate/up width and reused by every option that has it.

    Returns codes by width (the keys of ``widths``), each expert's method (``'gptq'``, ``'rtn'`` or ``'rtn (n
    tokens)'`` for experts with fewer than ``min_tokens`` routed tokens) and, with ``cap`` and ``with_err``, ``err
    [E, len(widths)]`` (module doc; quantized weights compared as the loader sees them: dequantized to
    ``weight_dtype``, then float32). ``expert_widths`` (one width per expert, each in ``widths``): expert e is
    quantized at its width only (a bit plan's write); the rows of the other widths' codes are left unset for it.

    ``packed``: the codes are :class:`PackedCodes` (each expert packed as it is quantized: ``bits / 8`` bytes per
    weight, never an int8 copy of the layer), else :class:`QuantizedExperts` (int8 codes). ``spill`` (a folder,
    with ``packed``, in one process): the codes' fields are :class:`~moecompress.quant.rowfile.RowFile` s there,
    each expert's rows written as they are made (host memory holds none of the layer's codes; the same bits).

    Memory: Hessians exist for ``chunk`` experts at a time (default :func:`hessian_chunk`, from ``--max-memory``
    or the device's free memory, and from the layer's size), built from the captured inputs per chunk.
    ``batched`` (default :func:`gptq_batched`: on CUDA, on the CPU where a batch holds more than one expert, or as
    ``$MOECOMPRESS_GPTQ_BATCHED`` says): the GPTQ experts of a chunk that share their widths go through one batched
    GPTQ call per projection and width (:func:`moecompress.quant.gptq.gptq_quantize_batched`), ``batch`` of them at
    a time (:func:`gptq_batch`; a given ``chunk`` is also the batch); the same codes as expert by expert up to
    float rounding (on the CPU bit for bit). Under
    torchrun each rank quantizes the experts of ``dist.share(E)`` and the codes and errors are then exchanged
    (``dist.fill_rows_``), so every rank returns the whole layer, bit for bit what one process computes.
    """
    if method not in ("gptq", "rtn"):
        raise ValueError(f"unknown method {method!r}")
    if method == "gptq" and cap is None:
        raise ValueError("gptq needs a LayerCapture")
    if expert_widths is not None and (len(expert_widths) != gate_up.shape[0] or set(expert_widths) - set(widths)):
        raise ValueError(f"expert_widths {list(expert_widths)} must give one of {widths} per expert")
    opts = opts or GPTQOptions()
    E, I2, H = gate_up.shape
    I = down.shape[-1]
    g_h, g_i = expert_group_sizes(H, I)
    dev = cap.device if cap is not None else torch.device("cpu")
    pairs = {w: split_width(w) for w in widths}
    out: dict[Width, Any] = {}
    if spill is not None and (not packed or dist.world() > 1):
        raise ValueError("spilled codes are packed, in one process")
    if packed:
        gu_packed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # gate/up codes once per gate/up width
        for w, (bg, bd) in pairs.items():
            out[w] = PackedCodes.empty(E, H, I, bg, bd, g_h, g_i, scale_dtype, gu_packed.get(bg), spill)
            gu_packed[bg] = out[w].gate_up, out[w].gate_up_s
        gu_codes = {q.bits: (q.gate_up, q.gate_up_s) for q in out.values()}
    else:
        gu_codes = {  # one gate/up code tensor per gate/up width, shared by the options that have it
            bg: (torch.empty(E, I2, H, dtype=torch.int8), torch.empty(E, I2, H // g_h, dtype=scale_dtype))
            for bg in dict.fromkeys(bg for bg, _ in pairs.values())
        }
        for w, (bg, bd) in pairs.items():
            out[w] = QuantizedExperts(
                bg, *gu_codes[bg], torch.empty(E, H, I, dtype=torch.int8),
                torch.empty(E, H, I // g_i, dtype=scale_dtype), g_h, g_i, None if bd == bg else bd,
            )  # fmt: skip
    down_of = {w: (q.down, q.down_s) if packed else (q.down_q, q.down_s) for w, q in out.items()}

    def store(q: torch.Tensor, bits: int) -> torch.Tensor:
        """One expert's int8 codes as kept: packed (on their device, then moved) or as they are."""
        return (pack_int32(q, bits) if packed else q).cpu()

    err = torch.zeros(E, len(widths), dtype=torch.float64) if (cap is not None and with_err) else None
    counts = cap.counts.tolist() if cap is not None else [0] * E
    gptq_e = [method == "gptq" and counts[e] >= min_tokens for e in range(E)]
    used = ["gptq" if g else ("rtn" if method == "rtn" else f"rtn ({counts[e]} tokens)") for e, g in enumerate(gptq_e)]

    def quantize_one(
        w: torch.Tensor, bits: int, g: int, prepared: PreparedHessian | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """GPTQ with the prepared Hessian when there is one (enough routed tokens), else RTN."""
        if prepared is None:
            return rtn_quantize(w, bits, g, scale_dtype)
        kw = {"clip_grid": opts.clip_grid, "actorder": opts.actorder, "clip": opts.clip, "prepared": prepared}
        kw["refine"] = opts.refine
        return gptq_quantize(w, None, bits, g, scale_dtype, opts.damp, **kw)

    def one_expert(e: int, hess: list[torch.Tensor | None]) -> None:
        """Expert ``e`` at its widths; ``hess`` = [its gate/up Hessian, its down Hessian] (None: RTN / not
        needed), taken out of the list so that, where the caller holds no other reference (a chunk's last
        expert), they are freed here once used."""
        gptq = gptq_e[e]
        h_gu, h_dn = hess
        hess.clear()
        # the chunk's Hessians are used once each: factorized in place (no copy of them), before the expert's
        # float32 weights and routed inputs exist (the factorization's peak, ~4 [H, H], then holds only the Hessian)
        ph_gu = prepare_hessian(h_gu, opts.damp, opts.actorder, opts.refine, inplace=True) if gptq else None
        ph_dn = None
        if gptq and not opts.sequential:
            ph_dn = prepare_hessian(h_dn, opts.damp, opts.actorder, opts.refine, inplace=True)
        del h_gu, h_dn  # (held by the prepared Hessians while they are)
        gu = gate_up[e].to(dev).float()  # [2I, H]
        xe = pe = None
        ref: list[torch.Tensor | None] = [None]
        want_routed = cap is not None and (with_err or (gptq and opts.sequential))
        mine_w = [w for w in widths if expert_widths is None or expert_widths[e] == w]
        bgs = list(dict.fromkeys(pairs[w][0] for w in mine_w))
        for bg in bgs:  # gate/up once per width, then each down width
            q1, s1 = quantize_one(gu, bg, g_h, ph_gu)
            gu_codes[bg][0][e], gu_codes[bg][1][e] = store(q1, bg), s1.cpu()
            if want_routed and bg == bgs[0]:  # the routed inputs and reference outputs are read after
                xe, pe = cap.routed(e)  # gate/up's first GPTQ, not held through it ([n, H] twice: ~0.1 GiB)
                ref[0] = _expert_out(gu, down[e].to(dev).float(), act, xe)[1] if with_err else None
            if bg == bgs[-1]:  # gate/up's last use: its weights and factorized Hessian (Hessian, factor) are not held
                gu = ph_gu = None  # through the dequantized copy or down's GPTQ (DeepSeek-V3 dims: ~0.5 GiB)
            gu_q = dequantize(q1, s1, g_h, weight_dtype).float()
            del q1, s1
            hq = None
            if xe is not None:
                hq = fused_hidden(xe, gu_q, act)  # [n, I] hidden of the quantized gate/up (no down_proj output)
                if bg == bgs[-1]:
                    xe = None  # the routed inputs' last use: not held through the error measure
            del gu_q
            if gptq and opts.sequential:
                hw = hq * pe.unsqueeze(-1) if opts.weighted else hq
                ph_dn = prepare_hessian(hw.T @ hw, opts.damp, opts.actorder, opts.refine, inplace=True)
                del hw
            dn = down[e].to(dev).float()  # [H, I] (upcast here: not held through gate/up's GPTQ)
            downs = [w for w in mine_w if pairs[w][0] == bg]
            for w in downs:
                j = widths.index(w)
                q2, s2 = quantize_one(dn, pairs[w][1], g_i, ph_dn)
                down_of[w][0][e], down_of[w][1][e] = store(q2, pairs[w][1]), s2.cpu()
                if err is not None and hq.shape[0]:
                    dn_q = dequantize(q2, s2, g_i, weight_dtype).float()
                    err[e, j] = _output_err(hq, dn_q, ref, 0, pe, bg == bgs[-1] and w == downs[-1])
                    del dn_q
                del q2, s2
            del dn

    def expert_batch(es: list[int], h_gu: torch.Tensor, h_dn: torch.Tensor | None) -> None:
        """:func:`one_expert` for the GPTQ experts ``es`` (one set of widths), each GPTQ a batched call over them:
        ``h_gu [n, H, H]``, ``h_dn [n, I, I]`` their Hessians (factorized in place)."""
        n = len(es)
        idx = torch.tensor(es)
        gu = gate_up.index_select(0, idx.to(gate_up.device)).to(dev).float()  # [n, 2I, H]
        dn = down.index_select(0, idx.to(down.device)).to(dev).float()  # [n, H, I]
        # [(X_e [m, H], p_e [m])]
        routed: list[Any] | None = [cap.routed(e) for e in es] if (with_err or opts.sequential) else None
        refs = [_expert_out(gu[k], dn[k], act, routed[k][0])[1] for k in range(n)] if with_err else None
        step = max(1, -(-n // 3))  # the factorization's temporaries: ~one more [n, C, C]
        kw = {"clip_grid": opts.clip_grid, "actorder": opts.actorder, "clip": opts.clip, "refine": opts.refine}
        ph_gu = prepare_hessian_batched(h_gu, opts.damp, opts.actorder, opts.refine, inplace=True, step=step)
        ph_dn = None
        if not opts.sequential:
            ph_dn = prepare_hessian_batched(h_dn, opts.damp, opts.actorder, opts.refine, inplace=True, step=step)
        mine_w = [w for w in widths if expert_widths is None or expert_widths[es[0]] == w]
        bgs = list(dict.fromkeys(pairs[w][0] for w in mine_w))
        for bg in bgs:
            q1, s1 = gptq_quantize_batched(gu, ph_gu, bg, g_h, scale_dtype, **kw)  # [n, 2I, H], [n, 2I, H / g_h]
            hqs: list[torch.Tensor | None] = [None] * n
            h_seq = torch.empty(n, I, I, device=dev) if opts.sequential else None
            for k, e in enumerate(es):
                gu_codes[bg][0][e], gu_codes[bg][1][e] = store(q1[k], bg), s1[k].cpu()
                if routed is not None:
                    gu_q = dequantize(q1[k], s1[k], g_h, weight_dtype).float()
                    hqs[k] = fused_hidden(routed[k][0], gu_q, act)  # [m, I] hidden of the quantized gate/up
                    if bg == bgs[-1]:
                        routed[k] = (None, routed[k][1])  # X_e's last use: not held through the error measure
                if h_seq is not None:
                    hw = hqs[k] * routed[k][1].unsqueeze(-1) if opts.weighted else hqs[k]
                    h_seq[k] = hw.T @ hw
                    del hw
            del q1, s1
            if bg == bgs[-1]:  # gate/up's last use: not held through down's GPTQ
                gu = ph_gu = None
            if h_seq is not None:
                ph_dn = prepare_hessian_batched(h_seq, opts.damp, opts.actorder, opts.refine, inplace=True, step=step)
            downs = [w for w in mine_w if pairs[w][0] == bg]
            for w in downs:
                j = widths.index(w)
                q2, s2 = gptq_quantize_batched(dn, ph_dn, pairs[w][1], g_i, scale_dtype, **kw)  # [n, H, I]
                for k, e in enumerate(es):
                    down_of[w][0][e], down_of[w][1][e] = store(q2[k], pairs[w][1]), s2[k].cpu()
                    if err is not None and routed[k][1].shape[0]:
                        dn_q = dequantize(q2[k], s2[k], g_i, weight_dtype).float()
                        last = bg == bgs[-1] and w == downs[-1]
                        err[e, j] = _output_err(hqs[k], dn_q, refs, k, routed[k][1], last)
                        if last:
                            hqs[k] = None
                del q2, s2

    # this rank's experts (all of them in one process), their Hessians built chunk by chunk within the memory bound
    mine = list(dist.share(E))
    if batched is None:
        batched = gptq_batched(dev)
    auto = batched is None
    batched = batched is not False and method == "gptq"
    batch = chunk
    if chunk is None:
        held = gate_up.numel() * gate_up.element_size() + down.numel() * down.element_size()
        if cap is None:
            chunk = batch = E
        elif batched:
            chunk, batch = gptq_batch(E, H, I, not opts.sequential, dev, layer_bytes=held)
            if auto and dev.type != "cuda" and batch == 1:  # the per-expert path, as fast with one expert per call
                batched, chunk = False, hessian_chunk(E, H, I, not opts.sequential, dev, layer_bytes=held)
        else:
            chunk = hessian_chunk(E, H, I, not opts.sequential, dev, layer_bytes=held)
    for c0 in range(0, len(mine), max(1, chunk)):
        ids = mine[c0 : c0 + max(1, chunk)]
        hs = [e for e in ids if gptq_e[e]]
        h_gu = h_dn = None
        if hs:
            assert cap is not None
            h_gu, h_dn = cap.hessians(
                hs, gate_up if not opts.sequential else None, act if not opts.sequential else None
            )
        if batched and hs:
            # GPTQ experts with the same widths together (a bit plan's write gives experts their own), in batches
            by_widths: dict[Any, list[int]] = {}
            for k, e in enumerate(hs):
                by_widths.setdefault(None if expert_widths is None else expert_widths[e], []).append(k)

            def take(t: torch.Tensor | None, ks: list[int]) -> torch.Tensor | None:
                """Rows ``ks`` of a chunk's Hessians: a view when they are consecutive, else a copy."""
                if t is None or ks == list(range(ks[0], ks[-1] + 1)):
                    return None if t is None else t[ks[0] : ks[-1] + 1]
                return t[torch.tensor(ks, device=t.device)]

            for ks in by_widths.values():
                for b0 in range(0, len(ks), max(1, batch)):
                    kb = ks[b0 : b0 + max(1, batch)]
                    expert_batch([hs[k] for k in kb], take(h_gu, kb), take(h_dn, kb))
            ids = [e for e in ids if e not in hs]  # the RTN experts, one by one below
        for e in ids:
            k = hs.index(e) if e in hs else None
            hess = [None if k is None else h_gu[k], None if (k is None or h_dn is None) else h_dn[k]]
            if hs and e == hs[-1]:  # the chunk's last GPTQ expert: its Hessians go when that expert is done with
                h_gu = h_dn = None  # them (with one expert a chunk, as at DeepSeek-V3 dims, each expert's)
            one_expert(e, hess)
        del h_gu, h_dn
    for t in [t for c in gu_codes.values() for t in c] + [t for d in down_of.values() for t in d]:
        if spill is None:  # (spilled codes are made in one process)
            dist.fill_rows_(t, E)  # every rank gets every expert's codes (a no-op in one process)
    if err is not None:
        dist.fill_rows_(err, E)
        err /= max(cap.tokens, 1)
    return out, used, err


def quantize_layer_experts(
    gate_up: torch.Tensor,
    down: torch.Tensor,
    bits: int,
    method: str,
    cap: LayerCapture | None,
    min_tokens: int,
    scale_dtype: torch.dtype,
    act: Callable[[torch.Tensor], torch.Tensor] = nn.functional.silu,
    opts: GPTQOptions | None = None,
) -> tuple[QuantizedExperts, list[str]]:
    """One width of :func:`quantize_layer` (no error measurement)."""
    codes, used, _ = quantize_layer(
        gate_up, down, act, (bits,), method, cap, min_tokens, scale_dtype, opts=opts, with_err=False
    )
    return codes[bits], used
