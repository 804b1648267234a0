"""The write pass of a budget plan: the existing transforms with explicit choices, in one engine pass.

    PruneTransform (the plan's kept experts) -> AtomTransform (the plan's kept channels, refit) -> quantization

Servable plans end with quant's ``QuantTransform`` at the plan's one width (uniform compressed-tensors, loaded by
transformers) or its width per layer (one scheme per layer: vLLM serves it, ``moecompress.load`` loads it). Exact
plans end with ``ExpertQuantTransform``: every kept expert quantized at its own bits (gate/up and down_proj each at
their own, quantize's per-projection options) and its own channel width (the atom stage leaves the block zero-padded
to one width per layer; each expert's real channels come first), written per expert with every module's bits in
``quantization_config``, loaded by ``moecompress.load`` (budget/load.py).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ..atomic.compensate import Refit
from ..atomic.transform import EXPERTS, AtomTransform
from ..core.engine import LayerContext
from ..prune.order import RouterSpec
from ..prune.transform import PruneOptions, PruneTransform
from ..quant.ctformat import quantization_config
from ..quant.layer import LayerCapture, Width, expert_group_sizes, quantize_layer, split_width
from ..quant.pack import pack_int32
from ..quant.rtn import dequantize
from ..quant.transform import QuantTransform, capture_layer, router_tensors

LAYOUT = "budget_exact"
JUDGE_EXPERTS = "judge_experts"  # ctx.extra: the written experts of a layer not propagated (budget/check.py)


def _sub_capture(cap: LayerCapture, experts: list[int], width: int) -> LayerCapture:
    """The capture of a subset of a layer's experts (renumbered 0..n-1), for quantizing them together."""
    sub = LayerCapture(len(experts), cap.hidden, width, cap.device, False, cap.weighted)
    idx = torch.tensor(experts, dtype=torch.long)
    if hasattr(cap, "h_gu"):  # Hessians accumulated during the capture (else built from the batches on demand)
        sub.h_gu = cap.h_gu[idx.to(cap.h_gu.device)]
    sub.counts = cap.counts[idx].clone()
    sub.max_abs = cap.max_abs[idx].clone()
    remap = torch.full((cap.num_experts,), -1, dtype=torch.long)
    remap[idx] = torch.arange(len(experts))
    sub.batches = [(x, remap[i], w) for x, i, w in cap.batches]
    sub.tokens = cap.tokens
    return sub


class ExpertQuantTransform(QuantTransform):
    """Quantize each routed expert at its own bits and channel width.

    ``plan``: {layer: {source expert: (width, bits)}} for every kept expert, bits an int (every projection) or
    ``(gate/up bits, down bits)``; the block's experts are mapped to source experts by ``ctx.extra["expert_ids"]``
    (set by the prune stage; absent: 0..E-1)."""

    layout = LAYOUT

    def __init__(self, plan: dict[int, dict[int, tuple[int, Width]]], method: str = "gptq", **kw: Any):
        bits = {l: [b for _, b in per.values()] for l, per in plan.items()}
        super().__init__(bits, method, **kw)
        self.plan = plan

    def moe_layer(self, ctx: LayerContext) -> None:
        ex, l, fam = ctx.experts, ctx.index, ctx.engine.fam
        gu_all, dn_all = ex.gate_up_proj.detach(), ex.down_proj.detach()  # [E, 2P, H], [E, H, P] (zero-padded)
        E, P = dn_all.shape[0], dn_all.shape[2]
        src = ctx.extra.get(EXPERTS) or list(range(E))
        choice = [self.plan[l][s] for s in src]  # (width, bits) per block expert
        cap = capture_layer(ctx, False, self.opts.weighted) if self.method == "gptq" else None
        gu_w = dn_w = None  # where the dequantized experts go: the block, a copy for judge windows, or nowhere
        if self.propagate:
            gu_w, dn_w = ex.gate_up_proj.data, ex.down_proj.data
        elif _judged(ctx):
            gu_w, dn_w = torch.empty_like(ex.gate_up_proj.data), torch.empty_like(ex.down_proj.data)
            ctx.extra[JUDGE_EXPERTS] = (gu_w, dn_w)
        out: dict[str, torch.Tensor] = {}
        used: list[str] = [""] * E
        rows: list[dict[str, Any]] = [{} for _ in range(E)]
        for width in sorted({w for w, _ in choice}):
            members = [e for e in range(E) if choice[e][0] == width]
            gu = torch.cat([gu_all[members, :width], gu_all[members, P : P + width]], dim=1)  # [n, 2w, H]
            dn = dn_all[members, :, :width]
            ws = [choice[e][1] for e in members]
            sub = _sub_capture(cap, members, width) if cap is not None else None
            codes, u, _ = quantize_layer(
                gu, dn, ex.act_fn, tuple(sorted(set(ws), key=split_width)), self.method, sub, self.min_tokens,
                self.scale_dtype,
                self.weight_dtype, self.opts, False, expert_widths=ws,
            )  # fmt: skip
            for j, e in enumerate(members):
                qe, b = codes[ws[j]], ws[j]
                used[e] = u[j]
                rows[e] = {"bits": split_width(b), "width": width, "g": (qe.g_h, qe.g_i)}
                for proj in range(3):
                    if proj == 2:
                        q, s = qe.down_q[j], qe.down_s[j]
                    else:
                        sl = slice(0, width) if proj == 0 else slice(width, 2 * width)
                        q, s = qe.gate_up_q[j, sl], qe.gate_up_s[j, sl]
                    base = fam.expert_key(l, e, proj)[: -len(".weight")]
                    out[base + ".weight_packed"] = pack_int32(q.contiguous(), split_width(b)[proj == 2])
                    out[base + ".weight_scale"] = s.contiguous()
                    out[base + ".weight_shape"] = torch.tensor(list(q.shape), dtype=torch.int64)
                # the block holds what the loader sees (zero padding kept); without propagation a copy of it goes
                # to ctx.extra for the judge windows of budget/check.py (the fitting batches see the source's)
                if gu_w is None or dn_w is None:
                    continue
                gq, dq = gu_w[e], dn_w[e]
                with torch.no_grad():
                    g = dequantize(qe.gate_up_q[j], qe.gate_up_s[j], qe.g_h, self.weight_dtype)
                    gq.zero_()
                    gq[:width] = g[:width].to(gq.dtype)
                    gq[P : P + width] = g[width:].to(gq.dtype)
                    dq.zero_()
                    dq[:, :width] = dequantize(qe.down_q[j], qe.down_s[j], qe.g_i, self.weight_dtype).to(dq.dtype)
        self.layers[l] = {
            "bits": [r["bits"] for r in rows], "widths": [r["width"] for r in rows], "used": used,
            "groups": [r["g"] for r in rows], "H": gu_all.shape[2], "I": P, "counts": None, "max_abs": None,
            "err": None,
        }  # fmt: skip
        ctx.replace({**out, **router_tensors(ctx)})

    def qconfig(self, fam: Any) -> dict[str, Any]:
        """Every routed module listed with its own bits and group size (widths differ per expert)."""
        modules: dict[str, tuple[int, int]] = {}
        for l, d in self.layers.items():
            for e, ((bg, bd), (g_h, g_i)) in enumerate(zip(d["bits"], d["groups"], strict=True)):
                for proj in range(3):
                    modules[fam.expert_key(l, e, proj)[: -len(".weight")]] = (bd, g_i) if proj == 2 else (bg, g_h)
        modules.update(self.other)
        ignore = ["lm_head", f"re:.*\\.{re.escape(fam.router)}$"]
        if fam.shared_gate:
            ignore.append(f"re:.*\\.{re.escape(fam.shared_gate)}$")
        return quantization_config(modules, ignore, fam.experts)

    def section(self) -> dict[str, Any]:
        out = super().section()
        out["layers"] = {str(l): {"bits": [b if b == d else [b, d] for b, d in d["bits"]], "widths": d["widths"]}
                         for l, d in self.layers.items()}  # fmt: skip
        return out


def transforms_for(plan: dict[str, Any], spec: RouterSpec, num_experts: int, keep: dict, other_bits: int,
                   protected: dict[int, set[int]], method: str = "gptq",
                   propagate: bool = False) -> list[Any]:  # fmt: skip
    """The write pass's transforms for ``plan`` (make_plan's dict); ``keep``: {layer: {width: [E, width]}}, the
    measuring pass's kept channels of each cut width. ``propagate``: later layers are calibrated on the quantized
    layers' outputs (as written), else on the unquantized (pruned and cut) layers'."""
    servable = plan["layout"] == "servable"
    layers = {int(l): v for l, v in plan["layers"].items()}
    I = plan["source_width"]
    out: list[Any] = []
    kept = {l: list(v["kept_experts"]) for l, v in layers.items()}
    removed = sum(num_experts - len(k) for k in kept.values())
    if removed:
        ratio = max(num_experts - len(k) for k in kept.values()) / num_experts  # the most any layer removes
        opts = PruneOptions(ratio=ratio, method="output-error", layout="uniform" if servable else "per-layer",
                            refit="none")  # fmt: skip
        t = PruneTransform(spec, num_experts, opts, protected, orders={})
        t.kept = kept
        out.append(t)
    if any(w != I for v in layers.values() for w in v["widths"]):
        channels = {}
        for l, v in layers.items():
            per = []
            kept_w = [r["width"] for r in v["experts"] if not r["removed"]]
            for r in v["experts"]:  # (a removed expert's entry is never read; servable: the layer's one width, which
                w = r["width"] if not r["removed"] else kept_w[0] if servable and kept_w else I  # the atom stage
                per.append(torch.arange(I) if w == I else keep[l][w][r["expert"]])  # reads from the first entry)
            channels[l] = per
        info = {"method": "budget plan (channels: routed second moment x |down column|^2)", "score": "budget"}
        out.append(AtomTransform(spec, keep=channels, layout="uniform" if servable else "exact", refit=Refit(),
                                 info=info))  # fmt: skip
    if servable:  # one width for every projection; one for the model, else per layer (plan.Structure)
        out.append(ServableQuantTransform(servable_bits(plan), method, min_tokens=32, other_bits=other_bits,
                                          propagate=propagate))  # fmt: skip
    else:
        per = {l: {r["expert"]: (r["width"], _bits(r)) for r in v["experts"] if not r["removed"]}
               for l, v in layers.items()}  # fmt: skip
        out.append(ExpertQuantTransform(per, method, min_tokens=32, other_bits=other_bits, propagate=propagate))
    return out


def servable_bits(plan: dict[str, Any]) -> int | dict[int, list[Width]]:
    """A servable plan's bits as ``QuantTransform`` takes them: one int when every kept expert of the model has it
    (transformers loads it), else {layer: [width per kept expert]} (one per layer; quantize's per-layer LP plan
    also holds protected experts at 8 bits)."""
    per = {int(l): [_bits(r) for r in v["experts"] if not r["removed"]] for l, v in plan["layers"].items()}
    one = {b for ws in per.values() for b in ws}
    b = next(iter(one))
    return b if len(one) == 1 and isinstance(b, int) else per


class ServableQuantTransform(QuantTransform):
    """quant's ``QuantTransform`` (one width for every routed expert, or per layer); without propagation the written
    experts go to ``ctx.extra[JUDGE_EXPERTS]`` for budget/check.py's judge windows and the block keeps the source's
    weights."""

    def __init__(self, bits: int | dict[int, list[Width]], method: str = "gptq", *, propagate: bool = False,
                 **kw: Any):  # fmt: skip
        super().__init__(bits, method, propagate=True, **kw)
        self.keep_block = not propagate

    def moe_layer(self, ctx: LayerContext) -> None:
        ex = ctx.experts
        judged = self.keep_block and _judged(ctx)
        orig = (ex.gate_up_proj.detach().clone(), ex.down_proj.detach().clone()) if judged else None
        self.propagate = not self.keep_block or judged  # the block quantized, for the next layer or the judge
        super().moe_layer(ctx)
        if orig is not None:
            ctx.extra[JUDGE_EXPERTS] = (ex.gate_up_proj.detach().clone(), ex.down_proj.detach().clone())
            with torch.no_grad():
                ex.gate_up_proj.copy_(orig[0])
                ex.down_proj.copy_(orig[1])

    def section(self) -> dict[str, Any]:
        return {**super().section(), "propagate_quantized": not self.keep_block}


def _judged(ctx: LayerContext) -> bool:
    """The pass has judge windows (budget/check.py's HeldOutEngine): they must see the written experts."""
    return hasattr(ctx.engine, "fit_batches")


def _bits(row: dict[str, Any]) -> Width:
    """A plan row's quantize width: ``b`` (every projection) or ``(gate/up bits, down bits)``."""
    bg, bd = row.get("gate_up_bits", row["bits"]), row.get("down_bits", row["bits"])
    return bg if bg == bd else (bg, bd)


__all__ = ["LAYOUT", "ExpertQuantTransform", "expert_group_sizes", "servable_bits", "transforms_for"]
