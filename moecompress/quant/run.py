"""`moecompress quantize`: mixed-precision quantization of routed experts with a global bit plan.

One layer-streamed calibration pass collects, per routed expert, GPTQ Hessians from that expert's routed tokens and
the MoE-block output error err[e, b] with only that expert quantized at b bits (see quant/layer.py). The plan
(``--plan lp``: the global ILP of quant/bitplan.py; ``--plan uniform``) is written to bit_plan.json, then a
compressed-tensors pack-quantized checkpoint + moecompress.json (layout "quantized") is written atomically.

The plan's cost predicts KL (``cost_model="kl"``, default): the same pass runs sensitivity probes (the first
calibration batch through the model with one layer's routed experts at 2, 3 and 4 bits, riding along the stream),
and each layer's errors are scaled so that their sum equals the layer's measured KL (make_plan). Super experts and
experts with too few calibration tokens get >= 8 bits in LP plans (``protect``; the plan lists them and why).

GPTQ (quant/gptq.py, quant/layer.py): static act-order with the plain group layout, Hessian-diagonal-weighted scale
search, router-weighted Hessians, gate/up before down_proj (whose Hessian comes from the quantized gate/up outputs).
The measuring pass propagates layer inputs through the *original* weights (errors are per expert, not compounded).
With ``GPTQOptions.propagate`` (off by default: measured no better) the written codes come from a second streamed
pass that quantizes each layer at its planned widths on the inputs of the already quantized earlier layers.
Without it the measured codes are kept up to ``MAX_CODE_CACHE_BYTES`` and written directly; above it the second
pass re-quantizes. Heavy math runs on ``device``, one expert at a time.
Attention / shared experts / dense MLPs are quantized with RTN at ``--other-bits`` (16 keeps them); routers, norms,
embeddings and lm_head are never quantized.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.checkpoint import Checkpoint
from ..core.errors import UserError
from ..core.progress import console, progress_bar
from .bitplan import allocate_bits_detailed
from .ctformat import quantization_config
from .layer import GPTQOptions, LayerCapture, QuantizedExperts, expert_group_sizes, quantize_layer
from .pack import pack_int32
from .rtn import SUPPORTED_BITS, dequantize, group_size_for, quantized_nbytes, rtn_quantize

WIDTHS = SUPPORTED_BITS  # candidate widths of the LP, (2, 3, 4, 8)
OTHER_BITS = (2, 3, 4, 8, 16)
PROBE_WIDTHS = (2, 3, 4)  # widths whose per-layer KL is measured (sensitivity of the plan cost)
PROTECT_BITS = 8  # super experts and experts with too few calibration tokens get at least this many bits
MAX_CODE_CACHE_BYTES = 8 * 1024**3
_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}
_ELT = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def scale_dtype_of(ckpt: Checkpoint) -> torch.dtype:
    """Scales are stored in the model's dtype (so transformers dequantizes into that dtype); bf16 if unknown."""
    dt = getattr(ckpt.config, "dtype", None) or getattr(ckpt.config, "torch_dtype", None)
    if isinstance(dt, str):
        dt = getattr(torch, dt, None)
    return dt if dt in (torch.float16, torch.bfloat16, torch.float32) else torch.bfloat16


class Layout:
    """Which checkpoint keys are routed experts, which other weights get --other-bits, which stay as they are."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        fam = ckpt.family
        self.fam = fam
        self.moe = list(ckpt.moe_layers)
        self.E = ckpt.num_experts
        self.info = ckpt.tensor_info()
        self.routed: dict[str, tuple[int, int, int]] = {}  # key -> (layer, expert, proj)
        for l in self.moe:
            for e in range(self.E):
                for proj in range(3):
                    k = fam.expert_key(l, e, proj)
                    if k not in self.info:
                        raise UserError(f"{k} is missing: moecompress quantize needs the hub per-expert layout")
                    self.routed[k] = (l, e, proj)
        k0 = fam.expert_key(self.moe[0], 0, 0)
        self.I, self.H = self.info[k0]["shape"]
        routed_pats = [fam.routed_key_pattern(l) for l in self.moe]
        self.other: list[str] = []
        for k, v in self.info.items():
            if k in self.routed or not k.endswith(".weight") or len(v["shape"]) != 2:
                continue
            if not k.startswith("model.layers."):
                continue  # embeddings, lm_head
            if any(p.match(k) for p in routed_pats):
                continue  # router
            if fam.shared_gate and f".{fam.shared_gate}." in k:
                continue
            self.other.append(k)

    def expert_bytes(self, bits: float, scale_bytes: int) -> float:
        """Bytes of one routed expert (3 projections) at ``bits`` (fractional: payload bits x params)."""
        g_h, g_i = expert_group_sizes(self.H, self.I)
        if bits in WIDTHS:
            return 2 * quantized_nbytes(self.I, self.H, int(bits), g_h, scale_bytes) + quantized_nbytes(
                self.H, self.I, int(bits), g_i, scale_bytes
            )
        payload = 3 * self.I * self.H * bits / 8
        scales = (2 * self.I * (self.H // g_h) + self.H * (self.I // g_i)) * scale_bytes
        return payload + scales + 3 * 16

    def fixed_bytes(self, other_bits: int, scale_bytes: int) -> int:
        """Bytes of everything but the routed experts in the output."""
        total = 0
        for k, v in self.info.items():
            if k in self.routed:
                continue
            if k in self.other and other_bits < 16:
                r, c = v["shape"]
                total += quantized_nbytes(r, c, other_bits, group_size_for(c), scale_bytes)
            else:
                total += _numel(v["shape"]) * _ELT.get(v["dtype"], 4)
        return total


def _validate(bits: float | None, budget_gb: float | None, plan: str, method: str, granularity: str, other_bits: int):
    if (bits is None) == (budget_gb is None):
        raise UserError("give exactly one of --bits B (average bits per routed-expert weight) or --budget-gb G")
    if plan not in ("lp", "uniform"):
        raise UserError(f"--plan {plan!r} is not one of lp, uniform")
    if method not in ("gptq", "rtn"):
        raise UserError(f"--method {method!r} is not one of gptq, rtn")
    if granularity not in ("layer", "expert"):
        raise UserError(f"--granularity {granularity!r} is not one of layer, expert")
    if other_bits not in OTHER_BITS:
        raise UserError(f"--other-bits {other_bits} is not one of {', '.join(map(str, OTHER_BITS))}")
    if plan == "uniform":
        if bits is None:
            raise UserError("--plan uniform needs --bits (one of 2, 3, 4, 8), not --budget-gb")
        if bits not in WIDTHS:
            raise UserError(f"--plan uniform supports --bits 2, 3, 4 or 8, got {bits:g}: use --plan lp for {bits:g}")
    if bits is not None and not 2 <= bits <= 8:
        raise UserError(f"--bits {bits:g} is outside 2..8 (the supported widths are 2, 3, 4, 8)")
    if budget_gb is not None and budget_gb <= 0:
        raise UserError(f"--budget-gb {budget_gb:g} must be positive")


def _importance(lay: Layout, prof: Any, mode: str) -> np.ndarray:
    """[L_moe, E] importance; super experts from the profile get x100."""
    imp = np.ones((len(lay.moe), lay.E))
    if prof is None:
        if mode != "uniform":
            raise UserError(f"--importance {mode} needs --profile RUN_DIR (a `moecompress profile` folder)")
        return imp
    for i, l in enumerate(lay.moe):
        if mode == "mass":
            imp[i] = prof.layer(l, "routing_mass").double().numpy() * lay.E
        elif mode == "reap":
            r = prof.layer(l, "reap").double().numpy()
            imp[i] = r / max(r.mean(), 1e-30)
        elif mode != "uniform":
            raise UserError(f"--importance {mode!r} is not one of uniform, mass, reap")
    for l, e in prof.super_experts:
        if l in lay.moe:
            imp[lay.moe.index(l), e] *= 100.0
    return imp


COST_RULES = {
    "kl": "predicted KL: err[l,e,b] x s[l,b], s[l,b] = measured KL with layer l's routed experts at b bits / "
    "sum_e err[l,e,b] (widths not probed use the nearest probed width below)",
    "err": "MoE-block output MSE with only that expert quantized (err[l,e,b]) x importance",
}


def layer_sensitivity(
    moe: list[int], widths: tuple[int, ...], err: np.ndarray, probe_kl: dict[tuple[int, int], float] | None
) -> np.ndarray:
    """``s [L, B]``: measured KL per unit of summed block-output error, per layer and width (see make_plan).

    Widths without a probe take the value of the nearest probed width below (else above). Without probes: ones."""
    L, B = len(moe), len(widths)
    s = np.ones((L, B))
    if not probe_kl:
        return s
    for li, l in enumerate(moe):
        probed = {b: probe_kl[(l, b)] for b in widths if (l, b) in probe_kl}
        if not probed:
            continue
        for j, b in enumerate(widths):
            below = [p for p in probed if p <= b]
            p = max(below) if below else min(probed)
            tot = err[li, :, widths.index(p)].sum()
            s[li, j] = max(probed[p], 0.0) / tot if tot > 0 else 0.0
    return s


def layer_pass(
    ckpt: Checkpoint,
    lay: Layout,
    input_ids: torch.Tensor | None,
    widths_of: Callable[[int], tuple[int, ...]],
    method: str,
    min_tokens: int,
    batch_size: int,
    device: torch.device,
    scale_dtype: torch.dtype,
    with_err: bool,
    label: str = "quantize",
    opts: GPTQOptions | None = None,
    probe: dict[str, Any] | None = None,
    propagate: dict[tuple[int, int], int] | None = None,
) -> Iterator[dict[str, Any]]:
    """Stream the model layer by layer; for each MoE layer yield its experts quantized at ``widths_of(layer)``
    (``codes`` by width), the method used per expert, routed-token counts, max |expert output| and (``with_err``)
    err [E, B]. Without calibration ids (RTN) the weights are read straight from the checkpoint.

    ``probe`` (a dict, filled when the pass ends): sensitivity probes. On the first calibration batch, a copy of
    the hidden states is run through the model with only layer l's routed experts at width b (for every MoE layer
    l and every width in ``probe["widths"]``), the rest exact; ``probe["kl"][(l, b)]`` is the measured
    KL(base || that model) per token. One streamed pass does it all: the copies ride along with the stream.

    ``propagate`` ({(layer, expert): bits}): the next layer's inputs come from this layer with its routed experts
    quantized at those widths (the write pass), instead of the original weights."""
    from ..core.stream import LayerStream
    from ..profile.stats import routed_forward

    E = lay.E
    wdtype = _DTYPES.get(lay.info[next(iter(lay.routed))]["dtype"], torch.float32)
    opts = opts or GPTQOptions()
    if input_ids is None:  # RTN needs no data
        with progress_bar() as bar:
            task = bar.add_task(f"{label}: rtn", total=len(lay.moe))
            for l in lay.moe:
                w = ckpt.moe_weights(l)
                gu, dn = torch.cat([w.gate, w.up], dim=1), w.down  # [E, 2I, H], [E, H, I]
                codes, used, _ = quantize_layer(
                    gu, dn, torch.nn.functional.silu, widths_of(l), "rtn", None, 0, scale_dtype, with_err=False
                )
                yield {"layer": l, "codes": codes, "used": used, "counts": None, "err": None, "max_abs": None}
                bar.advance(task)
        return
    fam = ckpt.family
    stream = LayerStream(ckpt, input_ids, batch_size=batch_size, device=device)
    n_layers = len(stream.decoder_layers)
    moe = set(lay.moe)
    states: dict[tuple[int, int], torch.Tensor] = {}  # (layer, bits) -> probe hidden states
    base_state: torch.Tensor | None = None

    def run(layer: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
        out = layer(h, **stream.kwargs[0])
        return out[0] if isinstance(out, tuple) else out

    try:
        with progress_bar() as bar:
            task = bar.add_task(label, total=n_layers)
            stream.capture()
            if probe is not None:
                base_state = stream.cache[0].to(device).clone()
            for l, layer in stream.layers():
                bar.update(task, description=f"{label}: layer {l + 1}/{n_layers}")
                if l not in moe:
                    if probe is not None:
                        with torch.no_grad():
                            base_state = run(layer, base_state)
                            states = {k: run(layer, h) for k, h in states.items()}
                    stream.forward_layer(layer)
                    bar.advance(task)
                    continue
                experts = getattr(stream.moe_block(layer), fam.experts)
                cap = LayerCapture(
                    E, experts.down_proj.shape[1], experts.down_proj.shape[2], device=device,
                    with_down=method == "gptq" and not opts.sequential, weighted=opts.weighted,
                )  # fmt: skip

                def fwd(hidden: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, _cap=cap, _ex=experts) -> Any:
                    _cap.add_batch(hidden, idx, w)
                    return routed_forward(_ex.gate_up_proj, _ex.down_proj, _ex.act_fn, hidden, idx, w, _cap.observer())

                experts.forward = fwd
                try:
                    with torch.no_grad():
                        for i in range(len(stream.cache)):
                            out = stream.run_layer(layer, i)
                            if propagate is None:
                                stream.cache[i] = out
                            del out
                finally:
                    del experts.forward
                codes, used, err = quantize_layer(
                    experts.gate_up_proj.detach(), experts.down_proj.detach(), experts.act_fn, widths_of(l), method,
                    cap, min_tokens, scale_dtype, wdtype, opts, with_err,
                )  # fmt: skip
                if propagate is not None:  # next inputs through the quantized experts, at their planned widths
                    with torch.no_grad():
                        for e in range(E):
                            qe = codes[propagate[(l, e)]]
                            g_h, g_i = qe.g_h, qe.g_i
                            experts.gate_up_proj[e] = dequantize(qe.gate_up_q[e], qe.gate_up_s[e], g_h, wdtype)
                            experts.down_proj[e] = dequantize(qe.down_q[e], qe.down_s[e], g_i, wdtype)
                        for i in range(len(stream.cache)):
                            stream.cache[i] = stream.run_layer(layer, i)
                if probe is not None:
                    with torch.no_grad():
                        new = {}
                        for b in probe["widths"]:
                            if b not in codes:
                                continue
                            orig = experts.gate_up_proj.detach().clone(), experts.down_proj.detach().clone()
                            gq, dq = codes[b].dequantized(wdtype)
                            experts.gate_up_proj.copy_(gq)
                            experts.down_proj.copy_(dq)
                            new[(l, b)] = run(layer, base_state)
                            experts.gate_up_proj.copy_(orig[0])
                            experts.down_proj.copy_(orig[1])
                            del orig
                        base_state = run(layer, base_state)
                        states = {k: run(layer, h) for k, h in states.items()}
                        states.update(new)
                yield {
                    "layer": l, "codes": codes, "used": used, "counts": cap.counts.numpy(),
                    "err": None if err is None else err.numpy(), "max_abs": cap.max_abs.numpy(),
                }  # fmt: skip
                del cap
                bar.advance(task)
            if probe is not None:
                probe["kl"] = _probe_kl(stream, base_state, states)
    finally:
        stream.close()


@torch.no_grad()
def _probe_kl(stream: Any, base: torch.Tensor, states: dict[tuple[int, int], torch.Tensor]) -> dict:
    """Mean per-token KL(base || probe) of the final distributions, one window at a time."""
    stream._ensure_head()
    norm, head = stream.model.model.norm, stream.model.lm_head

    def logp(h: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(head(norm(h)).float(), dim=-1)

    sums = dict.fromkeys(states, 0.0)
    for r in range(base.shape[0]):
        lb = logp(base[r : r + 1])
        pb = lb.exp()
        for k, h in states.items():
            sums[k] += float((pb * (lb - logp(h[r : r + 1]))).sum(-1).sum())
    n = base.shape[0] * base.shape[1]
    return {k: v / n for k, v in sums.items()}


def measure(
    ckpt: Checkpoint,
    lay: Layout,
    input_ids: torch.Tensor | None,
    widths: tuple[int, ...],
    method: str,
    min_tokens: int,
    batch_size: int,
    device: torch.device,
    scale_dtype: torch.dtype,
    keep_codes: bool = True,
    opts: GPTQOptions | None = None,
    probe_widths: tuple[int, ...] = PROBE_WIDTHS,
) -> dict[str, Any]:
    """Quantize every routed expert at every width in ``widths``; with calibration ids, also GPTQ Hessians,
    err[l, e, b] and the sensitivity probes (KL with one layer quantized at each of ``probe_widths``; none if
    empty). Returns codes per (layer, width) (empty unless ``keep_codes``), errors [L, E, B] (or None), token counts
    [L, E] (or None), max |expert output| [L, E] (or None), probe KLs {(layer, bits): KL} and methods used."""
    L, E = len(lay.moe), lay.E
    codes: dict[tuple[int, int], QuantizedExperts] = {}
    used: dict[int, list[str]] = {}
    data = input_ids is not None
    counts = np.zeros((L, E), dtype=np.int64) if data else None
    err = np.zeros((L, E, len(widths))) if data else None
    max_abs = np.zeros((L, E)) if data else None
    probe = {"widths": tuple(b for b in probe_widths if b in widths)} if data and probe_widths else None
    passes = layer_pass(
        ckpt, lay, input_ids, lambda l: widths, method, min_tokens, batch_size, device, scale_dtype,
        with_err=data, label="quantize: measure" if not keep_codes else "quantize", opts=opts, probe=probe,
    )  # fmt: skip
    for r in passes:
        l, li = r["layer"], lay.moe.index(r["layer"])
        used[l] = r["used"]
        if keep_codes:
            codes.update({(l, b): q for b, q in r["codes"].items()})
        if r["err"] is not None:
            err[li] = r["err"]
            counts[li] = r["counts"]
            max_abs[li] = r["max_abs"]
    return {
        "codes": codes, "err": err, "counts": counts, "used": used, "max_abs": max_abs,
        "probe_kl": probe.get("kl") if probe else None,
    }  # fmt: skip


def make_plan(
    lay: Layout,
    meas: dict[str, Any],
    widths: tuple[int, ...],
    plan: str,
    bits: float | None,
    budget_gb: float | None,
    granularity: str,
    other_bits: int,
    scale_bytes: int,
    importance: np.ndarray,
    min_tokens: int,
    cost_model: str = "kl",
    protect: bool = True,
    supers: list[tuple[int, int]] | tuple = (),
) -> dict[str, Any]:
    """The bit plan (as written to bit_plan.json): a width per routed expert, predicted cost and bytes.

    ``cost_model='kl'``: cost[l, e, b] = s[l, b] * err[l, e, b], with the layer sensitivity s[l, b] = (measured
    KL with all of layer l's experts at b bits) / (sum of err[l, :, b]), so a layer's summed cost equals its
    measured KL and costs across layers are in the same unit (predicted KL). ``'err'``: the raw block-output error.
    ``protect``: super experts (``supers``) and experts with fewer than ``min_tokens`` routed tokens get at least
    PROTECT_BITS bits in LP plans (they leave their layer's tie with --granularity layer)."""
    L, E = len(lay.moe), lay.E
    per_width = np.array([lay.expert_bytes(b, scale_bytes) for b in widths])  # [B]
    nbytes = np.tile(per_width, (L * E, 1))  # [N, B]
    fixed = lay.fixed_bytes(other_bits, scale_bytes)
    if bits is not None:
        budget = L * E * lay.expert_bytes(bits, scale_bytes)
    else:
        budget = budget_gb * 1e9 - fixed
        smallest = fixed + nbytes.min(axis=1).sum()
        if budget < nbytes.min(axis=1).sum():
            raise UserError(
                f"--budget-gb {budget_gb:g} is below the smallest possible model ({smallest / 1e9:.4f} GB with every "
                f"routed expert at {min(widths)} bits and other weights at --other-bits {other_bits}): raise it"
            )
    err = meas["err"]
    counts = meas["counts"]
    costs = None
    flagged: list[list[int]] = []
    sens = None
    if err is not None:
        e2 = err.copy()  # [L, E, B]
        for li in range(L):
            low = counts[li] < min_tokens
            flagged += [[lay.moe[li], int(e)] for e in np.where(low)[0]]
            if low.any() and (~low).any():  # unreliable measurement: use the layer's median measured error
                e2[li, low] = np.median(e2[li, ~low], axis=0)
        if cost_model == "kl":
            sens = layer_sensitivity(lay.moe, widths, e2, meas.get("probe_kl"))
            e2 = e2 * sens[:, None, :]
        costs = (importance[:, :, None] * e2).reshape(L * E, len(widths))
    protected: dict[tuple[int, int], str] = {}
    if protect and plan == "lp":
        for l, e in supers:
            if l in lay.moe:
                protected[(l, e)] = "super expert"
        for l, e in flagged:
            protected.setdefault((l, e), f"fewer than {min_tokens} calibration tokens")
    protect_note = None
    floor = per_width.min() * L * E  # every expert at the lowest width
    high = per_width[np.array(widths) >= PROTECT_BITS]
    extra = high.min() - per_width.min() if high.size else np.inf  # one expert raised to 8 bits
    if protected and floor + len(protected) * extra > budget:  # the budget cannot hold them: keep super experts
        dropped = [k for k, why in protected.items() if why != "super expert"]
        protected = {k: why for k, why in protected.items() if why == "super expert"}
        protect_note = f"{len(dropped)} few-token experts not protected: the budget cannot hold them at 8 bits"
        if floor + len(protected) * extra > budget:
            protected, protect_note = {}, "no expert protected: the budget cannot hold the super experts at 8 bits"
    allowed = np.ones((L * E, len(widths)), dtype=bool)
    for l, e in protected:
        allowed[lay.moe.index(l) * E + e] = np.array(widths) >= PROTECT_BITS
    solver = None
    if plan == "uniform":
        choice = np.full(L * E, widths.index(int(bits)))
    else:
        if costs is None:
            raise UserError("--plan lp needs calibration data to measure errors")
        groups = None
        if granularity == "layer":  # protected experts leave their layer's tie (their own item)
            groups = np.repeat(np.arange(L), E)
            for n, (l, e) in enumerate(protected):
                groups[lay.moe.index(l) * E + e] = L + n
        res = allocate_bits_detailed(costs, nbytes, budget, groups, allowed=allowed)
        choice = res.choice
        solver = {"name": res.solver, "status": res.status, "solve_s": round(res.solve_s, 3), **res.info}
    chosen_bits = np.array(widths)[choice].reshape(L, E)
    layers = {}
    for li, l in enumerate(lay.moe):
        rows = []
        for e in range(E):
            n = li * E + e
            rows.append(
                {
                    "expert": e,
                    "bits": int(chosen_bits[li, e]),
                    "bytes": int(nbytes[n, choice[n]]),
                    "predicted_cost": None if costs is None else float(costs[n, choice[n]]),
                    "err": None if err is None else {str(b): float(err[li, e, j]) for j, b in enumerate(widths)},
                    "tokens": None if counts is None else int(counts[li, e]),
                    "method": meas["used"][l][e],
                    "importance": float(importance[li, e]),
                    "protected": protected.get((l, e)),
                }
            )
        layers[str(l)] = {"bits": sorted({r["bits"] for r in rows}), "experts": rows}
    routed_bytes = int(nbytes[np.arange(L * E), choice].sum())
    n_params = L * E * 3 * lay.I * lay.H
    return {
        "plan": plan,
        "granularity": granularity if plan == "lp" else "layer",
        "widths": list(widths),
        "target_bits": bits,
        "budget_gb": budget_gb,
        "budget_bytes_routed": float(budget),
        "routed_bytes": routed_bytes,
        "fixed_bytes": int(fixed),
        "total_bytes": int(fixed + routed_bytes),
        "average_bits_routed": float((chosen_bits.sum() * 3 * lay.I * lay.H) / n_params),
        "predicted_cost": None if costs is None else float(costs[np.arange(L * E), choice].sum()),
        "other_bits": other_bits,
        "few_token_experts": flagged,
        "cost_model": cost_model if costs is not None else None,
        "cost_model_rule": COST_RULES.get(cost_model) if costs is not None else None,
        "sensitivity": None
        if sens is None
        else {str(l): dict(zip(map(str, widths), map(float, sens[li]), strict=True)) for li, l in enumerate(lay.moe)},
        "probe_kl": None if not meas.get("probe_kl") else {f"{l}:{b}": v for (l, b), v in meas["probe_kl"].items()},
        "protected": [[l, e, why] for (l, e), why in protected.items()],
        "protect_rule": (
            f"super experts and experts with fewer than {min_tokens} routed calibration tokens get "
            f">= {PROTECT_BITS} bits"
            if protect and plan == "lp"
            else "off"
        ),
        "protect_note": protect_note,
        "few_token_rule": f"fewer than {min_tokens} routed calibration tokens: RTN instead of GPTQ, and the layer's "
        "median measured error is used as its cost",
        "solver": solver,
        "width_counts": {str(b): int((chosen_bits == b).sum()) for b in widths},
        "layers": layers,
    }


def _tensors(
    ckpt: Checkpoint,
    lay: Layout,
    layer_codes: Iterable[tuple[int, dict[int, QuantizedExperts]]],
    plan: dict,
    other_bits: int,
    scale_dtype: torch.dtype,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) pairs of the output: every non-routed tensor (in the input's key order), then the routed
    experts layer by layer as ``layer_codes`` yields ``(layer, {bits: codes})`` (lazily: a streamed pass feeds it)."""
    bits_of = {(int(l), r["expert"]): r["bits"] for l, d in plan["layers"].items() for r in d["experts"]}
    I = lay.I
    for key in ckpt.keys():
        if key in lay.routed:
            continue
        if key in lay.other and other_bits < 16:
            w = ckpt.get(key)
            q, s = rtn_quantize(w, other_bits, group_size_for(w.shape[-1]), scale_dtype)
            base = key[: -len(".weight")]
            yield base + ".weight_packed", pack_int32(q, other_bits)
            yield base + ".weight_scale", s
            yield base + ".weight_shape", torch.tensor(list(w.shape), dtype=torch.int64)
        else:
            yield key, ckpt.get(key)
    for l, by_width in layer_codes:
        for e in range(lay.E):
            qe = by_width[bits_of[(l, e)]]
            for proj in range(3):
                if proj == 2:
                    q, s = qe.down_q[e], qe.down_s[e]
                else:
                    sl = slice(0, I) if proj == 0 else slice(I, 2 * I)
                    q, s = qe.gate_up_q[e, sl], qe.gate_up_s[e, sl]
                base = lay.fam.expert_key(l, e, proj)[: -len(".weight")]
                yield base + ".weight_packed", pack_int32(q.contiguous(), qe.bits)
                yield base + ".weight_scale", s.contiguous()
                yield base + ".weight_shape", torch.tensor(list(q.shape), dtype=torch.int64)


def _qconfig(lay: Layout, plan: dict, other_bits: int) -> dict[str, Any]:
    fam = lay.fam
    g_h, g_i = expert_group_sizes(lay.H, lay.I)
    names = fam.expert_names
    modules: dict[str, tuple[int, int]] = {}
    extra: dict[tuple[int, int], list[str]] = {}
    all_bits = {r["bits"] for d in plan["layers"].values() for r in d["experts"]}
    if len(all_bits) == 1:  # uniform: generic targets, one scheme for all routed experts (what vLLM expects)
        b = all_bits.pop()
        blk = re.escape(f".{fam.experts}.")
        gu = f"re:.*{blk}\\d+\\.(?:{re.escape(names[0])}|{re.escape(names[1])})$"
        dn = f"re:.*{blk}\\d+\\.{re.escape(names[2])}$"
        if g_h == g_i:
            extra[(b, g_h)] = [f"re:.*{blk}\\d+\\.(?:{'|'.join(re.escape(n) for n in names)})$"]
        else:
            extra[(b, g_h)] = [gu]
            extra.setdefault((b, g_i), []).append(dn)
    else:
        for key, (l, e, proj) in lay.routed.items():
            b = next(r["bits"] for r in plan["layers"][str(l)]["experts"] if r["expert"] == e)
            modules[key[: -len(".weight")]] = (b, g_i if proj == 2 else g_h)
    if other_bits < 16:
        for key in lay.other:
            c = lay.info[key]["shape"][1]
            modules[key[: -len(".weight")]] = (other_bits, group_size_for(c))
    ignore = ["lm_head", f"re:.*\\.{re.escape(fam.router)}$"]
    if fam.shared_gate:
        ignore.append(f"re:.*\\.{re.escape(fam.shared_gate)}$")
    return quantization_config(modules, ignore, fam.experts, extra)


def _super_experts(ckpt: Checkpoint, lay: Layout, prof: Any, meas: dict[str, Any]) -> tuple[list, dict | None]:
    """Super experts: the profile's when given, else detected with the profile's rule from this pass's max
    |expert output| (None without calibration data)."""
    from ..profile.stats import super_experts

    if prof is not None:
        return [tuple(x) for x in prof.super_experts], {"source": "profile"}
    if meas.get("max_abs") is None:
        return [], None
    max_abs = {(l, e): float(meas["max_abs"][li, e]) for li, l in enumerate(lay.moe) for e in range(lay.E)}
    chosen, rule = super_experts(max_abs, ckpt.config.num_hidden_layers)
    return chosen, {"source": "quantize calibration pass", **rule}


def run_quantize(
    model: str | Path | None,
    output: str | Path,
    bits: float | None = None,
    budget_gb: float | None = None,
    plan: str = "lp",
    method: str = "gptq",
    granularity: str = "layer",
    other_bits: int = 8,
    plan_only: bool = False,
    profile: str | Path | None = None,
    importance: str = "uniform",
    calib: str = "mixed",
    samples: int = 32,
    seq_len: int = 256,
    seed: int = 0,
    batch_size: int = 8,
    min_tokens: int = 32,
    device: torch.device | None = None,
    overwrite: bool = False,
    command: str | None = None,
    measurement: dict[str, Any] | None = None,
    max_cache_bytes: int = MAX_CODE_CACHE_BYTES,
    opts: GPTQOptions | None = None,
    cost_model: str = "kl",
    protect: bool = True,
) -> dict[str, Any]:
    """Quantize a model's routed experts (and other linears at ``other_bits``); returns the bit plan.

    Writes OUTPUT as a compressed-tensors pack-quantized folder with bit_plan.json and moecompress.json, or only
    OUTPUT/bit_plan.json when ``plan_only``. Refusals (nothing written) raise UserError.
    ``measurement`` (from :func:`measure_model`) reuses one calibration pass for several plans.
    """
    from ..calibration.sets import calibration_set, check_seq_len, load_tokenizer
    from ..core.writer import atomic_dir, check_output, write_checkpoint
    from ..profile.run import Profile

    t0 = time.time()
    _validate(bits, budget_gb, plan, method, granularity, other_bits)
    ckpt = Checkpoint(model)
    out = check_output(output, ckpt.path, overwrite)
    lay = Layout(ckpt)
    prof = None
    if profile is not None:
        prof = Profile.load(profile)
        prof.check_model(ckpt)
    imp = _importance(lay, prof, importance)
    scale_dtype = scale_dtype_of(ckpt)
    sb = torch.tensor([], dtype=scale_dtype).element_size()
    widths = WIDTHS if plan == "lp" else (int(bits),)
    if budget_gb is not None:  # refuse impossible budgets before any work
        fixed = lay.fixed_bytes(other_bits, sb)
        smallest = fixed + len(lay.moe) * lay.E * lay.expert_bytes(min(WIDTHS), sb)
        if budget_gb * 1e9 < smallest:
            raise UserError(
                f"--budget-gb {budget_gb:g} is below the smallest possible model ({smallest / 1e9:.4f} GB with every "
                f"routed expert at {min(WIDTHS)} bits and other weights at --other-bits {other_bits}): raise it"
            )
    # int8 codes of every candidate width of every expert; above the limit, the codes are not kept: a second
    # streamed pass re-quantizes each layer at its planned widths while the checkpoint is written
    streamed = len(lay.moe) * lay.E * 3 * lay.I * lay.H * len(widths) > max_cache_bytes
    if measurement is not None:  # reuse one calibration pass for several plans (benchmarks)
        opts = measurement.get("opts", opts)
        if measurement["method"] != method or measurement["fingerprint"] != ckpt.fingerprint:
            raise ValueError("measurement was made with another method or model")
        widths, meas, tokens = measurement["widths"], measurement["meas"], measurement["tokens"]
        if plan == "uniform" and int(bits) not in widths:
            raise ValueError(f"measurement has no codes at {bits} bits")
    else:
        need_data = plan == "lp" or method == "gptq"
        tokens = None
        if need_data:
            check_seq_len(seq_len, ckpt.config)
            tokens = calibration_set(load_tokenizer(ckpt.path), calib, samples, seq_len, seed)
        if streamed and tokens is None:  # uniform RTN on a large model: nothing to measure
            meas = {"codes": {}, "err": None, "counts": None, "used": {l: ["rtn"] * lay.E for l in lay.moe}}
        else:
            meas = measure(
                ckpt,
                lay,
                tokens.input_ids if tokens is not None else None,
                widths,
                method,
                min_tokens,
                batch_size,
                device or torch.device("cpu"),
                scale_dtype,
                keep_codes=not streamed and not (method == "gptq" and (opts or GPTQOptions()).propagate),
                opts=opts,
                probe_widths=PROBE_WIDTHS if (plan == "lp" and cost_model == "kl") else (),
            )
    supers, super_rule = _super_experts(ckpt, lay, prof, meas)
    bit_plan = make_plan(
        lay, meas, widths, plan, bits, budget_gb, granularity, other_bits, sb, imp, min_tokens, cost_model, protect,
        supers,
    )  # fmt: skip
    bit_plan.update(
        super_experts=[list(x) for x in supers],
        super_rule=super_rule,
        gptq=(opts or GPTQOptions()).describe() if method == "gptq" else None,
        method=method,
        importance=importance,
        calibration=tokens.describe() if tokens is not None else None,
        source_model=str(ckpt.path),
        source_fingerprint=ckpt.fingerprint,
    )
    console.print(
        f"bit plan: {bit_plan['width_counts']} experts per width, average {bit_plan['average_bits_routed']:.3f} "
        f"bits, {bit_plan['total_bytes'] / 1e6:.2f} MB predicted"
        + (f", cost {bit_plan['predicted_cost']:.4g}" if bit_plan["predicted_cost"] is not None else "")
    )
    if plan_only:
        with atomic_dir(out, overwrite=overwrite) as tmp:
            (tmp / "bit_plan.json").write_text(json.dumps(bit_plan, indent=1) + "\n")
        return bit_plan
    uniform = len({r["bits"] for d in bit_plan["layers"].values() for r in d["experts"]}) == 1
    config = ckpt.config.to_dict()
    config["quantization_config"] = _qconfig(lay, bit_plan, other_bits)
    warnings = []
    if bit_plan["few_token_experts"]:
        warnings.append(
            f"{len(bit_plan['few_token_experts'])} experts had fewer than {min_tokens} routed calibration tokens: "
            "RTN instead of GPTQ (see bit_plan.json few_token_experts)"
        )
    if not uniform:
        warnings.append("mixed widths: load exactly with moecompress.load (transformers/vLLM need one width)")
    manifest = {
        "command": "quantize",
        "command_line": command or "moecompress quantize",
        "layout": "quantized",
        "format": "compressed-tensors/pack-quantized",
        "servable": uniform or bit_plan["granularity"] == "layer",
        "source_model": str(ckpt.path),
        "source_fingerprint": ckpt.fingerprint,
        "method": method,
        "plan": plan,
        "bits": bits,
        "budget_gb": budget_gb,
        "other_bits": other_bits,
        "params_before": ckpt.num_params,
        "params_after": ckpt.num_params,
        "bytes_before": ckpt.bytes_on_disk,
        "bytes_predicted": bit_plan["total_bytes"],
        "warnings": warnings,
        "protected": [list(x) for x in supers],
        "calibration_fingerprint": tokens.fingerprint if tokens is not None else None,
        "layers": {l: {"bits": d["bits"]} for l, d in bit_plan["layers"].items()},
    }
    prop = method == "gptq" and (opts or GPTQOptions()).propagate
    second = prop or (streamed and measurement is None)
    if not second:
        layer_codes: Iterable = ((l, {b: meas["codes"][(l, b)] for b in widths}) for l in lay.moe)
    else:
        planned = {int(l): tuple(d["bits"]) for l, d in bit_plan["layers"].items()}
        bits_of = {(int(l), r["expert"]): r["bits"] for l, d in bit_plan["layers"].items() for r in d["experts"]}
        passes = layer_pass(
            ckpt, lay, tokens.input_ids if tokens is not None else None, lambda l: planned[l], method, min_tokens,
            batch_size, device or torch.device("cpu"), scale_dtype, with_err=False, label="quantize: write",
            opts=opts, propagate=bits_of if prop else None,
        )  # fmt: skip
        layer_codes = ((r["layer"], r["codes"]) for r in passes)
    manifest["streamed_write"] = bool(second)
    manifest["propagate_quantized"] = bool(prop)
    write_checkpoint(
        out,
        _tensors(ckpt, lay, layer_codes, bit_plan, other_bits, scale_dtype),
        config,
        ckpt.side_files(),
        manifest,
        overwrite=overwrite,
        extra_json={"bit_plan.json": bit_plan},
        started=t0,
        report_inputs=[Path(profile)] if profile is not None else [],
    )
    return bit_plan


def measure_model(
    model: str | Path | None,
    method: str = "gptq",
    calib: str = "mixed",
    samples: int = 32,
    seq_len: int = 256,
    seed: int = 0,
    batch_size: int = 8,
    min_tokens: int = 32,
    device: torch.device | None = None,
    opts: GPTQOptions | None = None,
    probe_widths: tuple[int, ...] = PROBE_WIDTHS,
    widths: tuple[int, ...] = WIDTHS,
) -> dict[str, Any]:
    """One calibration pass at every candidate width (``widths``; LP plans need all of WIDTHS), reusable by
    ``run_quantize(measurement=...)``."""
    from ..calibration.sets import calibration_set, check_seq_len, load_tokenizer

    ckpt = Checkpoint(model)
    lay = Layout(ckpt)
    check_seq_len(seq_len, ckpt.config)
    tokens = calibration_set(load_tokenizer(ckpt.path), calib, samples, seq_len, seed)
    t0 = time.time()
    meas = measure(
        ckpt, lay, tokens.input_ids, widths, method, min_tokens, batch_size, device or torch.device("cpu"),
        scale_dtype_of(ckpt), opts=opts, probe_widths=probe_widths,
    )  # fmt: skip
    return {
        "meas": meas,
        "tokens": tokens,
        "method": method,
        "opts": opts,
        "widths": widths,
        "fingerprint": ckpt.fingerprint,
        "elapsed_s": time.time() - t0,
    }
