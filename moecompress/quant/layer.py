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
original weights. Work runs on the device of the captured Hessians, one expert at a time (weights are upcast per
expert); the Hessian factorization of gate/up is computed once per expert and reused across widths, and only the
int8 codes and scales of each width are kept (on the CPU), never dequantized copies of the layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from moecompress.core.experts import fused_hidden
from moecompress.quant.gptq import DEFAULT_CLIP, PreparedHessian, gptq_quantize, prepare_hessian
from moecompress.quant.rtn import DEFAULT_CLIP_GRID, dequantize, group_size_for, rtn_quantize


@dataclass
class GPTQOptions:
    """Choices of the GPTQ pipeline (defaults are the measured best, see bench/quant_bench.py)."""

    actorder: bool = True  # static activation ordering (plain group layout)
    sequential: bool = True  # down_proj's Hessian from the quantized gate/up outputs
    clip: str = DEFAULT_CLIP  # per-group scale search: none | mse | hmse
    damp: float = 0.01
    # the written codes are computed in a second streamed pass whose layer inputs come from the already quantized
    # earlier layers (at their planned widths); the first pass (errors, plan) propagates the original weights.
    # Off by default: measured worse at 3 bits on both bench models and within noise at 4 (reports/quant_bench.md)
    propagate: bool = False
    # Hessians weight each routed token by its router weight squared (p^2 x x^T): the expert's error enters the
    # block output scaled by p, so this is the block-output error GPTQ should minimize
    weighted: bool = True
    clip_grid: tuple[float, ...] = DEFAULT_CLIP_GRID  # shrink factors of the scale search

    def describe(self) -> dict:
        return {
            "router_weighted_hessians": self.weighted,
            "actorder": self.actorder, "sequential": self.sequential, "clip": self.clip, "damp": self.damp,
            "propagate_quantized": self.propagate,
        }  # fmt: skip


@dataclass
class LayerCapture:
    """Routed inputs and Hessians of one MoE layer, accumulated batch by batch (Hessians on ``device``)."""

    num_experts: int
    hidden: int  # H
    width: int  # I
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    with_down: bool = True  # accumulate H_down of the original weights (not needed when sequential)
    weighted: bool = True  # Hessians weight tokens by their router weight squared
    batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (x, idx, w)
    h_gu: torch.Tensor = field(init=False)  # [E, H, H]
    h_down: torch.Tensor | None = field(init=False)  # [E, I, I]
    counts: torch.Tensor = field(init=False)  # [E]
    max_abs: torch.Tensor = field(init=False)  # [E] max |down_proj output| (super experts)
    tokens: int = 0

    def __post_init__(self) -> None:
        E = self.num_experts
        self.h_gu = torch.zeros(E, self.hidden, self.hidden, device=self.device)
        self.h_down = torch.zeros(E, self.width, self.width, device=self.device) if self.with_down else None
        self.counts = torch.zeros(E, dtype=torch.long)
        self.max_abs = torch.zeros(E, dtype=torch.float64)

    def observer(self) -> Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]:
        """Hook for ``experts.routed_forward``: adds one batch's per-expert Hessians (call after ``add_batch``)."""
        x_all, _, w_all = self.batches[-1]

        def observe(e: int, token_idx: torch.Tensor, pos: torch.Tensor, h: torch.Tensor, f: torch.Tensor) -> None:
            tok = token_idx.cpu()
            x = x_all[tok].to(self.device)  # [n, H]
            p = w_all[tok, pos.cpu()].to(self.device).unsqueeze(-1) if self.weighted else 1.0  # [n, 1]
            self.h_gu[e] += (x * p).T @ (x * p)
            if self.h_down is not None:
                hf = h.detach().float().to(self.device) * p  # [n, I]
                self.h_down[e] += hf.T @ hf
            self.counts[e] += token_idx.numel()
            self.max_abs[e] = max(float(self.max_abs[e]), float(f.detach().abs().max()))

        return observe

    def add_batch(self, hidden: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> None:
        """Keep one batch's MoE inputs ``hidden [T, H]``, ``idx [T, k]``, ``weights [T, k]`` (float32, CPU)."""
        self.batches.append((hidden.detach().float().cpu(), idx.detach().cpu(), weights.detach().float().cpu()))
        self.tokens += hidden.shape[0]

    def routed(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(X_e [n, H], p_e [n])``: the routed inputs of expert ``e`` and their router weights, on ``device``."""
        xs, ps = [], []
        for x, idx, w in self.batches:
            tok, pos = torch.where(idx == e)
            xs.append(x[tok])
            ps.append(w[tok, pos])
        if not xs:
            return torch.zeros(0, self.hidden, device=self.device), torch.zeros(0, device=self.device)
        return torch.cat(xs).to(self.device), torch.cat(ps).to(self.device)


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

    def dequantized(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gate_up [E, 2I, H], down [E, H, I])`` as the loader will see them."""
        return dequantize(self.gate_up_q, self.gate_up_s, self.g_h, dtype), dequantize(
            self.down_q, self.down_s, self.g_i, dtype
        )


def _expert_out(gu: torch.Tensor, dn: torch.Tensor, act: Callable, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(h [n, I], f [n, H])`` of one expert (fused gate/up ``gu [2I, H]``) through the one expert kernel."""
    h = fused_hidden(x, gu, act)  # [n, I]
    return h, nn.functional.linear(h, dn)  # [n, H]


@torch.no_grad()
def quantize_layer(
    gate_up: torch.Tensor,  # [E, 2I, H] (any dtype/device; upcast per expert)
    down: torch.Tensor,  # [E, H, I]
    act: Callable[[torch.Tensor], torch.Tensor],
    widths: tuple[int, ...],
    method: str,
    cap: LayerCapture | None,
    min_tokens: int,
    scale_dtype: torch.dtype,
    weight_dtype: torch.dtype = torch.float32,
    opts: GPTQOptions | None = None,
    with_err: bool = True,
    expert_widths: Sequence[int] | None = None,
) -> tuple[dict[int, QuantizedExperts], list[str], torch.Tensor | None]:
    """Quantize every routed expert of a layer at every width in ``widths``.

    Returns codes by width, each expert's method (``'gptq'``, ``'rtn'`` or ``'rtn (n tokens)'`` for experts with
    fewer than ``min_tokens`` routed tokens) and, with ``cap`` and ``with_err``, ``err [E, len(widths)]`` (module
    doc; quantized weights compared as the loader sees them: dequantized to ``weight_dtype``, then float32).
    ``expert_widths`` (one width per expert, each in ``widths``): expert e is quantized at its width only (a bit
    plan's write); the rows of the other widths' codes are left unset for it.
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
    out = {
        b: QuantizedExperts(
            b,
            torch.empty(E, I2, H, dtype=torch.int8),
            torch.empty(E, I2, H // g_h, dtype=scale_dtype),
            torch.empty(E, H, I, dtype=torch.int8),
            torch.empty(E, H, I // g_i, dtype=scale_dtype),
            g_h,
            g_i,
        )
        for b in widths
    }
    err = torch.zeros(E, len(widths), dtype=torch.float64) if (cap is not None and with_err) else None
    used: list[str] = []

    def quantize_one(
        w: torch.Tensor, bits: int, g: int, prepared: PreparedHessian | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """GPTQ with the prepared Hessian when there is one (enough routed tokens), else RTN."""
        if prepared is None:
            return rtn_quantize(w, bits, g, scale_dtype)
        kw = {"clip_grid": opts.clip_grid, "actorder": opts.actorder, "clip": opts.clip, "prepared": prepared}
        return gptq_quantize(w, None, bits, g, scale_dtype, opts.damp, **kw)

    for e in range(E):
        gu = gate_up[e].to(dev).float()  # [2I, H]
        dn = down[e].to(dev).float()  # [H, I]
        n = int(cap.counts[e]) if cap is not None else 0
        gptq = method == "gptq" and n >= min_tokens
        used.append("gptq" if gptq else ("rtn" if method == "rtn" else f"rtn ({n} tokens)"))
        xe = pe = ref = None
        if cap is not None and (with_err or (gptq and opts.sequential)):
            xe, pe = cap.routed(e)
            ref = _expert_out(gu, dn, act, xe)[1] if with_err else None
        ph_gu = prepare_hessian(cap.h_gu[e], opts.damp, opts.actorder) if gptq else None
        ph_dn = None
        if gptq and not opts.sequential:
            ph_dn = prepare_hessian(cap.h_down[e], opts.damp, opts.actorder)
        for j, b in enumerate(widths):
            if expert_widths is not None and expert_widths[e] != b:
                continue
            q1, s1 = quantize_one(gu, b, g_h, ph_gu)
            gu_q = dequantize(q1, s1, g_h, weight_dtype).float()
            hq = None
            if xe is not None:
                hq = _expert_out(gu_q, dn, act, xe)[0]  # [n, I] outputs of the quantized gate/up
            if gptq and opts.sequential:
                hw = hq * pe.unsqueeze(-1) if opts.weighted else hq
                ph_dn = prepare_hessian(hw.T @ hw, opts.damp, opts.actorder)
            q2, s2 = quantize_one(dn, b, g_i, ph_dn)
            qe = out[b]
            qe.gate_up_q[e], qe.gate_up_s[e] = q1.cpu(), s1.cpu()
            qe.down_q[e], qe.down_s[e] = q2.cpu(), s2.cpu()
            if err is not None and xe.shape[0]:
                dn_q = dequantize(q2, s2, g_i, weight_dtype).float()
                d = (nn.functional.linear(hq, dn_q) - ref) * pe.unsqueeze(-1)
                err[e, j] = d.double().pow(2).sum().item()
    if err is not None:
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
