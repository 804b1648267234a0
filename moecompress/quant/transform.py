"""Quantization on the engine: two per-layer transforms.

``QuantTransform`` quantizes each MoE layer's routed experts (GPTQ with per-expert Hessians from the layer's own
routing, or RTN) at the widths it is given (one width for every expert, or a bit plan {layer: width per expert}),
hands the engine the packed compressed-tensors tensors (``ctx.replace``), quantizes the other linear weights at
``other_bits`` as they are written (``rewrite``) and adds ``quantization_config`` to config.json (``config``).

``MeasureTransform`` is the measuring pass of an LP bit plan, which needs every layer's measurements before any
width is chosen: per expert and candidate width, the MoE-block output error err[e, b] (quant/layer.py), routed
token counts and max |expert output|, plus the sensitivity probes (a copy of the first calibration batch rides
through the model with one layer's experts at b bits; see ``probe_layer``). It changes nothing.

    measure = MeasureTransform(WIDTHS, "gptq", probe_widths=(2, 3, 4))
    Engine(...).run([measure], emit=measure.probe_layer)     # pass 1 (+ measure.probe_kl(engine) at the end)
    plan = make_plan(...)                                    # quant/run.py
    Engine(...).run([QuantTransform(plan_widths)], emit=out.add_layer)   # pass 2: the codes that are written

Chaining: QuantTransform quantizes the block as an earlier stage left it (fewer or narrower experts; its fused
``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]``), never the checkpoint's routed weights. With ``propagate``
(default) it leaves the block holding the dequantized weights, so the next layer is calibrated on the quantized
layer (sequential calibration). ``propagate=False`` keeps the original weights in the block: what the single
``quantize`` command does by default (``GPTQOptions.propagate``; the measured default, byte-identical to before).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..core.engine import Engine, LayerContext, Transform
from ..core.experts import routed_forward
from ..core.interface import observing
from . import keys
from .codecache import CodeCache
from .ctformat import quantization_config
from .layer import (
    GPTQOptions,
    LayerCapture,
    PackedCodes,
    QuantizedExperts,
    Width,
    expert_group_sizes,
    quantize_layer,
    split_width,
)
from .pack import pack_int32
from .rtn import SUPPORTED_BITS, group_size_for, rtn_quantize

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


def scale_dtype_for(config: Any) -> torch.dtype:
    """Scales are stored in the model's dtype (so transformers dequantizes into that dtype); bf16 if unknown."""
    dt = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dt, str):
        dt = getattr(torch, dt, None)
    return dt if dt in (torch.float16, torch.bfloat16, torch.float32) else torch.bfloat16


class _Capture(Transform):
    """Observer that accumulates one layer's routed inputs and Hessians (``engine.observe_inputs``)."""

    def __init__(self, cap: LayerCapture):
        self.cap = cap

    def observe_forward(self, ctx: LayerContext, batch: int, hidden: torch.Tensor, idx: torch.Tensor, w: Any) -> Any:
        self.cap.add_batch(hidden, idx, w)
        return self.cap.observer()


def capture_layer(ctx: LayerContext, with_down: bool, weighted: bool) -> LayerCapture:
    """Routed inputs and Hessians of the MoE block as it is now, on ``ctx.inputs`` with the block's own routing."""
    down = ctx.experts.down_proj  # [E, H, I]
    cap = LayerCapture(down.shape[0], down.shape[1], down.shape[2], ctx.engine.device, with_down, weighted)
    ctx.engine.observe_inputs(ctx, [_Capture(cap)])
    return cap


def _fused(ctx: LayerContext) -> tuple[torch.Tensor, torch.Tensor]:
    ex = ctx.experts
    gu, dn = getattr(ex, "gate_up_proj", None), getattr(ex, "down_proj", None)
    if not isinstance(gu, torch.Tensor) or gu.dim() != 3 or not isinstance(dn, torch.Tensor):
        raise ValueError(
            f"layer {ctx.index}: quantize needs fused equal-width experts (gate_up_proj [E, 2I, H]); "
            "per-expert widths of an exact atom layout cannot be quantized"
        )
    return gu.detach(), dn.detach()


def weight_dtype_of(engine: Engine) -> torch.dtype:
    """The checkpoint's dtype of the routed expert weights (what the loader dequantizes into)."""
    ck = engine.ckpt
    return DTYPES.get(keys.expert_info(ck, ck.moe_layers[0], 0)[1], torch.float32)


class QuantTransform(Transform):
    """Quantize routed experts at ``bits`` (an int for every expert, or {layer: [width per expert]}, a width being
    an int or a per-projection option ``(gate/up bits, down bits)``).

    Also collects per layer what the bit plan reports: ``used`` (method per expert), ``counts``, ``max_abs`` and,
    with ``with_err``, ``err [E, 1]`` at the layer's width (uniform width only)."""

    name = "quantize"
    reads_narrow = True  # expert weights are upcast per expert where used (core/stream.py narrow)
    layout = "quantized"  # compressed-tensors: moecompress.load reads any plan (transformers: uniform widths)

    def __init__(
        self,
        bits: int | Mapping[int, Sequence[Width]],
        method: str = "gptq",
        *,
        min_tokens: int = 32,
        opts: GPTQOptions | None = None,
        other_bits: int = 16,
        propagate: bool = True,
        with_err: bool = False,
        codes: Mapping[tuple[int, int], QuantizedExperts | PackedCodes] | None = None,
    ):
        if method not in ("gptq", "rtn"):
            raise ValueError(f"method {method!r} is not one of gptq, rtn")
        plan_widths = (
            {bits} if isinstance(bits, int) else {b for ws in bits.values() for w in ws for b in split_width(w)}
        )
        if not plan_widths <= set(SUPPORTED_BITS):
            raise ValueError(f"widths {sorted(plan_widths)} are not all in {SUPPORTED_BITS}")
        if other_bits not in (*SUPPORTED_BITS, 16):
            raise ValueError(f"other_bits {other_bits} is not one of {SUPPORTED_BITS} or 16")
        if with_err and not isinstance(bits, int):
            raise ValueError("with_err needs one width for every expert")
        self.bits, self.method, self.min_tokens = bits, method, min_tokens
        self.opts = opts or GPTQOptions()
        self.other_bits, self.propagate, self.with_err = other_bits, propagate, with_err
        if codes is not None and (with_err or propagate):
            raise ValueError("precomputed codes are for the block's own weights: no with_err, no propagate")
        self.codes = codes
        self.layers: dict[int, dict[str, Any]] = {}  # layer -> bits, used, counts, err, max_abs, H, I
        self.other: dict[str, tuple[int, int]] = {}  # module -> (bits, group) of the --other-bits weights
        self._engine: Engine | None = None

    def start(self, engine: Engine) -> None:
        self._engine = engine
        self.scale_dtype = scale_dtype_for(engine.ckpt.config)
        self.weight_dtype = weight_dtype_of(engine)

    def widths(self, layer: int, num_experts: int) -> list[Width]:
        if isinstance(self.bits, int):
            return [self.bits] * num_experts
        ws = list(self.bits[layer])
        if len(ws) != num_experts:
            raise ValueError(f"layer {layer}: the plan gives {len(ws)} widths for {num_experts} experts")
        return ws

    def moe_layer(self, ctx: LayerContext) -> None:
        gu, dn = _fused(ctx)
        E, l = gu.shape[0], ctx.index
        ws = self.widths(l, E)
        uniq = tuple(sorted(set(ws), key=split_width))
        cap = err = used = None
        if self.codes is not None:  # quantized by the measuring pass on the same inputs: the same codes
            codes = {b: self.codes[(l, b)] for b in uniq}
        else:
            if self.method == "gptq" or self.with_err:
                cap = capture_layer(ctx, self.method == "gptq" and not self.opts.sequential, self.opts.weighted)
            codes, used, err = quantize_layer(
                gu, dn, ctx.experts.act_fn, uniq, self.method, cap, self.min_tokens, self.scale_dtype,
                self.weight_dtype, self.opts, self.with_err, expert_widths=None if len(uniq) == 1 else ws, packed=True,
            )  # fmt: skip
        self.layers[l] = {
            "bits": ws, "used": used, "H": gu.shape[2], "I": dn.shape[2],
            "counts": None if cap is None else cap.counts.numpy(),
            "max_abs": None if cap is None else cap.max_abs.numpy(),
            "err": None if err is None else err.numpy(),
        }  # fmt: skip
        ctx.replace({**self.packed(ctx, codes, ws), **router_tensors(ctx)})
        if self.propagate:  # the block holds what the loader will see: the next layer is calibrated on it
            with torch.no_grad():
                for e, b in enumerate(ws):
                    gq, dq = codes[b].dequantized_expert(e, self.weight_dtype)
                    ctx.experts.gate_up_proj[e], ctx.experts.down_proj[e] = gq, dq

    def packed(
        self, ctx: LayerContext, codes: Mapping[Width, QuantizedExperts | PackedCodes], ws: list[Width]
    ) -> dict[str, torch.Tensor]:
        """weight_packed / weight_scale / weight_shape of every routed projection (hub names)."""
        fam, out = ctx.engine.fam, {}
        for e, b in enumerate(ws):
            qe = codes[b]
            pre = isinstance(qe, PackedCodes)
            I, H = (qe.I, qe.H) if pre else (qe.down_q.shape[-1], qe.down_q.shape[-2])
            for proj in range(3):
                if proj == 2:
                    shape = [H, I]
                    w, s = (qe.down[e], qe.down_s[e]) if pre else (qe.down_q[e], qe.down_s[e])
                else:
                    sl = slice(0, I) if proj == 0 else slice(I, 2 * I)
                    shape = [I, H]
                    w, s = (
                        (qe.gate_up[e, sl], qe.gate_up_s[e, sl]) if pre else (qe.gate_up_q[e, sl], qe.gate_up_s[e, sl])
                    )
                base = keys.expert_key(fam, ctx.index, e, proj)[: -len(".weight")]
                wb = split_width(b)[1 if proj == 2 else 0]
                out[base + ".weight_packed"] = w.contiguous() if pre else pack_int32(w.contiguous(), wb)
                out[base + ".weight_scale"] = s.contiguous()
                out[base + ".weight_shape"] = torch.tensor(shape, dtype=torch.int64)
        return out

    def is_other(self, key: str, t: torch.Tensor) -> bool:
        """Attention, shared-expert and dense-MLP weights (quantized at ``other_bits``); never routers, shared
        gates, norms, embeddings or lm_head."""
        if not key.startswith("model.layers.") or not key.endswith(".weight") or t.dim() != 2:
            return False
        assert self._engine is not None, "rewrite before the pass started"
        fam, l = self._engine.fam, int(key.split(".")[2])
        if l in self._engine.moe and fam.routed_key_pattern(l).match(key):
            return False
        return not (fam.shared_gate and f".{fam.shared_gate}." in key)

    def rewrite(self, key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor] | None:
        if self.other_bits >= 16 or not self.is_other(key, tensor):
            return None
        g = group_size_for(tensor.shape[-1])
        q, s = rtn_quantize(tensor, self.other_bits, g, self.scale_dtype)
        base = key[: -len(".weight")]
        self.other[base] = (self.other_bits, g)
        return {
            base + ".weight_packed": pack_int32(q, self.other_bits),
            base + ".weight_scale": s,
            base + ".weight_shape": torch.tensor(list(tensor.shape), dtype=torch.int64),
        }

    @property
    def uniform(self) -> bool:
        """One width for every routed projection (what transformers loads: it reads one width for a fused
        experts module, so one option with gate/up and down at different widths everywhere is not uniform)."""
        ws = {split_width(b) for d in self.layers.values() for b in d["bits"]}
        return len(ws) == 1 and len(set(next(iter(ws)))) == 1

    def config(self, cfg: dict[str, Any]) -> None:
        assert self._engine is not None
        cfg["quantization_config"] = self.qconfig(self._engine.fam)

    def qconfig(self, fam: Any) -> dict[str, Any]:
        """compressed-tensors quantization_config: one generic scheme when every routed expert has one width
        (what transformers and vLLM expect), else every routed module listed with its width."""
        names, modules = keys.expert_names(fam), {}
        extra: dict[tuple[int, int], list[str]] = {}
        shapes = {(d["H"], d["I"]) for d in self.layers.values()}
        if self.uniform and len(shapes) == 1:
            b, bd = split_width(next(iter(self.layers.values()))["bits"][0])
            g_h, g_i = expert_group_sizes(*shapes.pop())
            blk = re.escape(f".{fam.experts}.")
            if (b, g_h) == (bd, g_i):
                extra[(b, g_h)] = [f"re:.*{blk}\\d+\\.(?:{'|'.join(re.escape(n) for n in names)})$"]
            else:
                extra[(b, g_h)] = [f"re:.*{blk}\\d+\\.(?:{re.escape(names[0])}|{re.escape(names[1])})$"]
                extra.setdefault((bd, g_i), []).append(f"re:.*{blk}\\d+\\.{re.escape(names[2])}$")
        else:
            for l, d in self.layers.items():
                g_h, g_i = expert_group_sizes(d["H"], d["I"])
                for e, w in enumerate(d["bits"]):
                    for proj in range(3):
                        b = split_width(w)[1 if proj == 2 else 0]
                        modules[keys.expert_key(fam, l, e, proj)[: -len(".weight")]] = (b, g_i if proj == 2 else g_h)
        modules.update(self.other)
        ignore = ["lm_head", f"re:.*\\.{re.escape(fam.router)}$"]
        if fam.shared_gate:
            ignore.append(f"re:.*\\.{re.escape(fam.shared_gate)}$")
        return quantization_config(modules, ignore, fam.experts, extra)

    def section(self) -> dict[str, Any]:
        few = sum(u.startswith("rtn (") for d in self.layers.values() for u in d["used"] or [])
        warn = f"{few} experts had fewer than {self.min_tokens} routed calibration tokens: RTN instead of GPTQ"
        return {
            "warnings": [warn] if few else [],
            "format": "compressed-tensors/pack-quantized",
            "method": self.method,
            "bits": self.bits if isinstance(self.bits, int) else None,
            "other_bits": self.other_bits,
            "gptq": self.opts.describe() if self.method == "gptq" else None,
            "propagate_quantized": self.propagate,
            "layers": {str(l): {"bits": _json_widths(d["bits"])} for l, d in self.layers.items()},
        }


def _json_widths(ws: Sequence[Width]) -> list:
    """A layer's distinct widths for JSON: ints, and ``[gate/up bits, down bits]`` for per-projection options."""
    return [list(w) if isinstance(w, tuple) else w for w in sorted(set(ws), key=split_width)]


def transform_for_recipe(job: Any, opts: Mapping[str, Any], prof: Any = None) -> QuantTransform:
    """The ``quantize`` stage of a compress recipe, ``{bits, method: gptq, other_bits: 8}``: every routed expert at
    ``bits``, sequential calibration (the block is left quantized for the next layer and the next stage), experts
    with fewer than 32 routed tokens by RTN. The profile is not needed."""
    return QuantTransform(
        int(opts["bits"]), str(opts.get("method", "gptq")), min_tokens=32, other_bits=int(opts.get("other_bits", 8)),
        propagate=True,
    )  # fmt: skip


def router_tensors(ctx: LayerContext) -> dict[str, torch.Tensor]:
    """The layer's router weight (and biases) under their hub names, in the checkpoint's dtype of each key."""
    fam, l, r = ctx.engine.fam, ctx.index, ctx.router
    info = ctx.engine.ckpt.tensor_info()
    found = {fam.router_key(l): r.weight}
    if fam.router_bias and getattr(r, "bias", None) is not None:
        found[fam.router_key(l, "bias")] = r.bias
    if (corr := fam.correction_of(ctx.block)) is not None:  # where the family holds it (router or block)
        found[fam.router_key(l, fam.correction_bias)] = fam.correction_disk(corr)
    wd = DTYPES.get(info.get(fam.router_key(l), {}).get("dtype", ""), torch.float32)
    return {
        k: t.detach().to(DTYPES.get(info[k]["dtype"], wd) if k in info else wd).contiguous() for k, t in found.items()
    }


class MeasureTransform(Transform):
    """The LP plan's measuring pass: every expert at every width of ``widths`` (codes are not kept), its error
    err[e, b], routed tokens and max |output|; with ``probe_widths``, the sensitivity probes (drive the pass with
    ``emit=probe_layer``, then ``probe_kl(engine)``). Results by layer in ``err``, ``counts``, ``max_abs``,
    ``used``; with ``keep_codes``, every width's codes in ``codes``, packed as written (``PackedCodes``: bits / 8
    bytes per expert weight per width) for a write pass that gets them instead of quantizing again
    (``QuantTransform(codes=...)``); with ``spill_codes`` every width's codes go to files as each expert is
    quantized (``CodeCache``, quant/rowfile.py: host memory holds none of them, kept or not; the probes read their
    widths back from the files)."""

    name = "quantize"
    reads_narrow = True  # expert weights are upcast per expert where used (core/stream.py narrow)
    changes_block = False

    def __init__(
        self,
        widths: Sequence[Width],
        method: str = "gptq",
        *,
        min_tokens: int = 32,
        opts: GPTQOptions | None = None,
        probe_widths: tuple[int, ...] = (),
        keep_codes: bool = False,
        spill_codes: bool = False,
    ):
        self.widths, self.method, self.min_tokens = tuple(widths), method, min_tokens
        self.codes = CodeCache(spill_codes) if keep_codes else None  # (layer, width) -> PackedCodes
        # where the layer's codes are made when spilled (files of codes not kept go when the layer's are dropped)
        self._spill = (self.codes if self.codes is not None else CodeCache(True)) if spill_codes else None
        self.opts = opts or GPTQOptions()
        # a probe at b bits uses the width b, or the option (b, b)
        self._probe = {b: w for b in probe_widths for w in (b, (b, b)) if w in self.widths}
        self.probe_widths = tuple(self._probe)
        self.err: dict[int, np.ndarray] = {}  # [E, B]
        self.counts: dict[int, np.ndarray] = {}  # [E]
        self.max_abs: dict[int, np.ndarray] = {}  # [E]
        self.used: dict[int, list[str]] = {}
        self._codes: dict[int, PackedCodes] = {}
        self._base: torch.Tensor | None = None  # the probe batch through the exact model
        self._states: dict[tuple[int, int], torch.Tensor] = {}  # (layer, bits) -> probe batch, layer at bits

    def start(self, engine: Engine) -> None:
        self.scale_dtype = scale_dtype_for(engine.ckpt.config)
        self.weight_dtype = weight_dtype_of(engine)
        if self.probe_widths and len(engine.cache):
            self._base = engine.cache[0].to(engine.device).clone()

    def moe_layer(self, ctx: LayerContext) -> None:
        gu, dn = _fused(ctx)
        cap = capture_layer(ctx, self.method == "gptq" and not self.opts.sequential, self.opts.weighted)
        codes, used, err = quantize_layer(
            gu, dn, ctx.experts.act_fn, self.widths, self.method, cap, self.min_tokens, self.scale_dtype,
            self.weight_dtype, self.opts, True, packed=True, spill=None if self._spill is None else self._spill.folder,
        )  # fmt: skip
        l = ctx.index
        self.used[l], self.counts[l], self.max_abs[l] = used, cap.counts.numpy(), cap.max_abs.numpy()
        self.err[l] = err.numpy() if err is not None else np.zeros((gu.shape[0], len(self.widths)))
        self._codes = {b: codes[w] for b, w in self._probe.items()}
        if self.codes is not None:  # packed as written (gate/up codes shared by the options that have them)
            self.codes.put_layer(l, codes)

    @torch.no_grad()
    def probe_layer(self, ctx: LayerContext) -> None:
        """``emit`` of the measuring pass (every layer, after its forward): the probe batch and its copies go
        through this layer; for a MoE layer, new copies start with its experts at each probe width."""
        if self._base is None:
            return
        kwargs = ctx.engine.stream.layer_kwargs(ctx.index, 0)  # this layer type's mask (mixed layer types)

        def run(h: torch.Tensor) -> torch.Tensor:
            out = ctx.layer(h, **kwargs)
            return out[0] if isinstance(out, tuple) else out

        new = {}
        if ctx.is_moe:
            ex = ctx.experts
            for b, qe in self._codes.items():  # the block's experts at b bits, dequantized per hit expert
                gu, dn = _Dequantized(qe, 0, self.weight_dtype), _Dequantized(qe, 1, self.weight_dtype)
                with observing(ex, lambda h, i, w, gu=gu, dn=dn: routed_forward(gu, dn, ex.act_fn, h, i, w)):
                    new[(ctx.index, b)] = run(self._base)
            self._codes = {}
        self._base = run(self._base)
        self._states = {k: run(h) for k, h in self._states.items()}
        self._states.update(new)

    def probe_kl(self, engine: Engine) -> dict[tuple[int, int], float] | None:
        """Mean per-token KL(base || probe) of the final distributions, one window at a time (after the pass)."""
        if self._base is None:
            return None
        return probe_kl(self._base, self._states, engine.stream.head)


class _Dequantized:
    """The fused gate_up (``which`` 0) or down_proj (1) of packed codes as ``routed_forward`` indexes them: expert
    ``e``'s weights dequantized when it is hit, so no layer-sized copy exists."""

    def __init__(self, qe: PackedCodes, which: int, dtype: torch.dtype):
        self.qe, self.which, self.dtype = qe, which, dtype
        self.shape = (qe.gate_up.shape[0],)

    def __getitem__(self, e: int) -> torch.Tensor:
        return self.qe.weight(e, self.which, self.dtype)


@torch.no_grad()
def probe_kl(base: torch.Tensor, states: dict[Any, torch.Tensor], head: Any) -> dict[Any, float]:
    """Mean per-token KL(base || probe) of the final distributions: ``base`` and each ``states[k]`` are the last
    hidden states [windows, seq, H] of the unchanged and the probed model, ``head`` maps them to logits (one window
    at a time, so only one window's logits are held)."""

    def logp(h: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(head(h).float(), dim=-1)

    sums = dict.fromkeys(states, 0.0)
    for r in range(base.shape[0]):
        lb = logp(base[r : r + 1])
        pb = lb.exp()
        for k, h in states.items():
            sums[k] += float((pb * (lb - logp(h[r : r + 1]))).sum(-1).sum())
    n = base.shape[0] * base.shape[1]
    return {k: v / n for k, v in sums.items()}
