"""Per-MoE-layer work of `moecompress quantize`: routed-token Hessians, per-expert quantization at every candidate
width, and the measured block-output error err[e, b] (pure tensor code, no I/O).

For expert e with routed tokens X_e, top-k router weights p_e(x) (as the block applies them) and unweighted output
f_e(x), the MoE block output changes by p_e(x) (f_e^q(x) - f_e(x)) when only expert e is quantized (routing is
unchanged: the router is never quantized), so

    err[e, b] = sum_{x in X_e} p_e(x)^2 || f_e^{q,b}(x) - f_e(x) ||^2 / T        (T: all calibration tokens)

is exactly the mean squared MoE-block output error with only expert e quantized at b bits.
GPTQ Hessians per expert come from that expert's routed tokens only: H_gu[e] = X_e^T X_e for gate/up (one GPTQ run
on the fused [2I, H] matrix: rows are independent given H) and H_down[e] = h_e^T h_e with h = act(gate x) * (up x).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from moecompress.quant.gptq import gptq_quantize
from moecompress.quant.rtn import dequantize, group_size_for, rtn_quantize


@dataclass
class LayerCapture:
    """Routed inputs and Hessians of one MoE layer, accumulated batch by batch."""

    num_experts: int
    hidden: int  # H
    width: int  # I
    batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (x, idx, w)
    h_gu: torch.Tensor = field(init=False)  # [E, H, H]
    h_down: torch.Tensor = field(init=False)  # [E, I, I]
    counts: torch.Tensor = field(init=False)  # [E]
    tokens: int = 0

    def __post_init__(self) -> None:
        E = self.num_experts
        self.h_gu = torch.zeros(E, self.hidden, self.hidden)
        self.h_down = torch.zeros(E, self.width, self.width)
        self.counts = torch.zeros(E, dtype=torch.long)

    def observer(self) -> Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]:
        """Hook for ``stats.routed_forward`` that adds one batch's per-expert Hessians (call after ``add_batch``)."""
        x_all = self.batches[-1][0]

        def observe(e: int, token_idx: torch.Tensor, pos: torch.Tensor, h: torch.Tensor, f: torch.Tensor) -> None:
            x = x_all[token_idx.cpu()]  # [n, H]
            self.h_gu[e] += x.T @ x
            hf = h.detach().float().cpu()  # [n, I]
            self.h_down[e] += hf.T @ hf
            self.counts[e] += token_idx.numel()

        return observe

    def add_batch(self, hidden: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> None:
        """Keep one batch's MoE inputs ``hidden [T, H]``, ``idx [T, k]``, ``weights [T, k]`` (float32, CPU)."""
        self.batches.append((hidden.detach().float().cpu(), idx.detach().cpu(), weights.detach().float().cpu()))
        self.tokens += hidden.shape[0]


def expert_group_size(hidden: int, width: int) -> int:
    """One group size for all routed-expert projections (gate/up read H columns, down reads I): transformers and
    vLLM apply one scheme to a fused experts module. 128 when it divides both H and I (every real MoE model)."""
    return group_size_for(math.gcd(hidden, width))


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


def quantize_layer_experts(
    gate_up: torch.Tensor,  # [E, 2I, H]
    down: torch.Tensor,  # [E, H, I]
    bits: int,
    method: str,
    cap: LayerCapture | None,
    min_tokens: int,
    scale_dtype: torch.dtype,
) -> tuple[QuantizedExperts, list[str]]:
    """Quantize every routed expert of a layer at ``bits``; returns the codes and each expert's method used.

    ``method='gptq'`` uses the expert's own Hessians; experts with fewer than ``min_tokens`` routed tokens fall back
    to round-to-nearest (method recorded as ``'rtn (n tokens)'``).
    """
    E, I2, H = gate_up.shape
    I = down.shape[-1]
    g_h = g_i = expert_group_size(H, I)
    gu = gate_up.float()
    dn = down.float()
    if method == "rtn":
        q1, s1 = rtn_quantize(gu, bits, g_h, scale_dtype)
        q2, s2 = rtn_quantize(dn, bits, g_i, scale_dtype)
        return QuantizedExperts(bits, q1, s1, q2, s2, g_h, g_i), ["rtn"] * E
    if method != "gptq":
        raise ValueError(f"unknown method {method!r}")
    assert cap is not None
    q1 = torch.empty(E, I2, H, dtype=torch.int8)
    s1 = torch.empty(E, I2, H // g_h, dtype=scale_dtype)
    q2 = torch.empty(E, H, I, dtype=torch.int8)
    s2 = torch.empty(E, H, I // g_i, dtype=scale_dtype)
    used = []
    for e in range(E):
        n = int(cap.counts[e])
        if n < min_tokens:
            q1[e], s1[e] = rtn_quantize(gu[e], bits, g_h, scale_dtype)
            q2[e], s2[e] = rtn_quantize(dn[e], bits, g_i, scale_dtype)
            used.append(f"rtn ({n} tokens)")
            continue
        q1[e], s1[e] = gptq_quantize(gu[e], cap.h_gu[e], bits, g_h, scale_dtype)
        q2[e], s2[e] = gptq_quantize(dn[e], cap.h_down[e], bits, g_i, scale_dtype)
        used.append("gptq")
    return QuantizedExperts(bits, q1, s1, q2, s2, g_h, g_i), used


@torch.no_grad()
def expert_errors(
    gate_up: torch.Tensor,  # [E, 2I, H]
    down: torch.Tensor,  # [E, H, I]
    act: Callable[[torch.Tensor], torch.Tensor],
    cap: LayerCapture,
    quantized: list[QuantizedExperts],
    weight_dtype: torch.dtype,
) -> torch.Tensor:
    """``err [E, len(quantized)]``: mean squared MoE-block output error with only expert e quantized (see module doc).

    Quantized weights are compared as the loader sees them (dequantized to ``weight_dtype``, then float32).
    """
    E = gate_up.shape[0]
    err = torch.zeros(E, len(quantized), dtype=torch.float64)
    deq = [qe.dequantized(weight_dtype) for qe in quantized]
    ref_gu, ref_dn = gate_up.float(), down.float()
    for x, idx, w in cap.batches:
        for e in torch.unique(idx).tolist():
            if e < 0 or e >= E:
                continue
            tok, pos = torch.where(idx == e)
            xe = x[tok]  # [n, H]
            p = w[tok, pos].unsqueeze(-1)  # [n, 1] the block weighs f_e by the router weights as given

            def f(gu: torch.Tensor, dn: torch.Tensor, xe: torch.Tensor = xe) -> torch.Tensor:
                g, u = nn.functional.linear(xe, gu).chunk(2, dim=-1)
                return nn.functional.linear(act(g) * u, dn)  # [n, H]

            ref = f(ref_gu[e], ref_dn[e])
            for j, (gu_q, dn_q) in enumerate(deq):
                d = (f(gu_q[e].float(), dn_q[e].float()) - ref) * p
                err[e, j] += d.double().pow(2).sum()
    return err / max(cap.tokens, 1)
