"""From measurements to a plan: predicted costs in KL units, exact bytes, the integer program, plan.json.

Cost of option o of expert e in layer l (predicted KL, comparable across kinds and layers):
  removed:            s_rm[l]  * err_rm[e]
  kept at full width: quantize's LP cost of the option (``quant.plan.option_costs``: s_q[l] * err[e, o], one KL factor
                      per layer for every (gate/up, down) option, few-token experts at their layer's median error)
  kept cut to w:      s_cut[l, w] * err_cut[e, w] + s_q[l] * max(err[e, w, o] - err_cut[e, w], 0)
with s_q = ``quant.plan.option_sensitivity`` (the per-projection LP's calibration: layer l's measured KL with all its
experts at the lowest probed width / their summed error there), s_cut[l, w] = KL with all of layer l's experts cut
to width w / their summed err_cut[:, w] (one probe per cut width: a 75% cut is not a third of a 50% cut), and
s_rm[l] = KL with the layer's removal probe / the summed err_rm of the experts it removed. At full width the costs
and bytes are exactly those of `quantize --plan lp --granularity expert`, so its plan is in the program's feasible
set. Without probes every s is 1 (raw block-output error).

Protection (exact layout, as quant's LP plan): super experts are never removed and stay at full width and >= 8
bits; experts with fewer than ``min_tokens`` routed calibration tokens (their GPTQ error is measured on the tokens
it was fitted to) may be removed or kept at full width and >= 8 bits, unless the budget cannot hold that (then they
are free, and plan.json says so). Where quantize's LP plan fits the budget, each group (super experts, few-token
experts) is held at >= 8 bits exactly when quantize's plan holds it (``quant_protection``), so no protection of the
joint program excludes quantize's plan. Servable plans keep one expert count and one channel width for the whole
model (what a config states: transformers and vLLM read one ``num_experts`` and one ``moe_intermediate_size``) and
choose per layer one bit width for every projection of its kept experts (one quantization scheme per layer, what
vLLM serves; transformers 5.23 loads only one width for the model exactly, so mixed layers load with
``moecompress.load``). ``bits_only``: the quantize-only plan the joint plan is checked against (budget/check.py):
quantize's own LP plan at the same budget (``quant.plan.make_plan`` on this measurement), per projection and expert
for exact layouts (``--granularity expert``), per layer for servable ones (``--granularity layer``, quantize's
servable plan), as `quantize --plan lp --budget-gb` would write it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..core.checkpoint import DTYPE_BYTES, Checkpoint
from ..core.errors import UserError
from ..prune.order import RouterSpec
from ..quant.layer import Width, split_width
from ..quant.plan import PROTECT_BITS, WIDTHS, Layout, scale_dtype_of
from ..quant.plan import make_plan as quant_make_plan
from ..quant.plan import option_costs as quant_costs
from ..quant.plan import plan_protection as quant_protected
from .measure import PROBE_REMOVE, BudgetMeasure, cut_key
from .options import PAIRS, Option, menu, option_bytes
from .solve import Shape, servable_plan, smallest_bytes, solve


def _gb(n: float) -> str:
    return f"{n / 1e9:.4g} GB = {n:,.0f} bytes"


def bf16_bytes(ckpt: Checkpoint) -> int:
    """Bytes of every tensor of the checkpoint at 2 bytes per value (what --budget-ratio is a fraction of)."""
    total = 0
    for v in ckpt.tensor_info().values():
        n = 1
        for s in v["shape"]:
            n *= s
        total += 2 * n
    return total


def router_keys(ckpt: Checkpoint, l: int) -> list[str]:
    fam, info = ckpt.family, ckpt.tensor_info()
    keys = [fam.router_key(l)]
    if fam.router_bias:
        keys.append(fam.router_key(l, "bias"))
    if fam.correction_bias:
        keys.append(fam.router_key(l, fam.correction_bias))
    return [k for k in keys if k in info]


def byte_model(ckpt: Checkpoint, other_bits: int) -> tuple[int, int, int, int]:
    """``(fixed bytes, router-row bytes per expert, scale bytes, hidden)``: fixed = every tensor but the routed
    experts and routers of the MoE layers (other weights at ``other_bits``); a kept expert adds its router row."""
    lay = Layout(ckpt)
    sb = scale_dtype_of(ckpt).itemsize
    info = ckpt.tensor_info()
    E = ckpt.num_experts
    router = 0
    for k in router_keys(ckpt, lay.moe[0]):
        n = 1
        for s in info[k]["shape"]:
            n *= s
        router += n * DTYPE_BYTES.get(info[k]["dtype"], 4)
    routers_total = 0
    for l in lay.moe:
        for k in router_keys(ckpt, l):
            n = 1
            for s in info[k]["shape"]:
                n *= s
            routers_total += n * DTYPE_BYTES.get(info[k]["dtype"], 4)
    return lay.fixed_bytes(other_bits, sb) - routers_total, router // E, sb, lay.H


def quant_measurement(m: BudgetMeasure, moe: list[int], kl: dict) -> dict[str, Any]:
    """The full-width part of the measurement as quantize's measuring pass reports it (``quant.plan.make_plan``'s
    ``meas``): err [L, E, O] at ``m.options``, counts [L, E], the bit probes {(layer, bits): KL}, used, max_abs."""
    return {
        "err": np.stack([m.err[l][:, 0, :] for l in moe]),
        "counts": np.stack([m.counts[l] for l in moe]),
        "max_abs": np.stack([m.max_abs[l] for l in moe]),
        "used": {l: m.used[l] for l in moe},
        "probe_kl": {(l, b): v for (l, b), v in kl.items() if isinstance(b, int)} or None,
    }


def costs_of(m: BudgetMeasure, ckpt: Checkpoint, opts: dict[int, list[Option]], kl: dict) -> tuple[np.ndarray, dict]:
    """``(costs [L, E, O], sensitivities)`` (module docstring)."""
    lay = Layout(ckpt)
    moe = lay.moe
    L, E = len(moe), len(m.err_rm[moe[0]])
    widths = m.widths[moe[0]]
    meas = quant_measurement(m, moe, kl)
    q, _, s_q = quant_costs(lay, meas, m.options, np.ones((L, E)), m.min_tokens, "kl")  # [L*E, O], [L]
    q = q.reshape(L, E, len(m.options))
    s_q = np.ones(L) if s_q is None else s_q
    s_cut, s_rm = np.ones((L, len(widths))), np.ones(L)
    for li, l in enumerate(moe):
        probed = [wi for wi, w in enumerate(widths) if (l, cut_key(w)) in kl]
        for wi in range(1, len(widths) if probed else 1):
            p = min(probed, key=lambda j: (abs(j - wi), -j))  # this width's probe, else the nearest (narrower first)
            tot = m.err_cut[l][:, p].sum()
            s_cut[li, wi] = max(kl[(l, cut_key(widths[p]))], 0.0) / tot if tot > 0 else 0.0
        if (l, PROBE_REMOVE) in kl:
            tot = m.err_rm[l][m.removal_probe[l]].sum()
            s_rm[li] = max(kl[(l, PROBE_REMOVE)], 0.0) / tot if tot > 0 else 0.0
        elif meas["probe_kl"]:  # no removal probe (e.g. nothing removable): the bits' factor
            s_rm[li] = s_q[li]
    O = len(opts[moe[0]])
    costs = np.zeros((L, E, O))
    index = {split_width(o): j for j, o in enumerate(m.options)}
    for li, l in enumerate(moe):
        for o, opt in enumerate(opts[l]):
            if opt.removed:
                costs[li, :, o] = s_rm[li] * m.err_rm[l]
                continue
            wi, oi = widths.index(opt.width), index[opt.pair]
            if wi == 0:
                costs[li, :, o] = q[li, :, oi]
                continue
            cut = m.err_cut[l][:, wi]
            costs[li, :, o] = s_cut[li, wi] * cut + s_q[li] * np.maximum(m.err[l][:, wi, oi] - cut, 0.0)
    sens = {
        str(l): {"bits": float(s_q[li]),
                 "cut": {str(w): float(s_cut[li, wi]) for wi, w in enumerate(widths) if wi},
                 "remove": float(s_rm[li])}
        for li, l in enumerate(moe)
    }  # fmt: skip
    return costs, sens


def quant_protection(
    ckpt: Checkpoint, m: BudgetMeasure, budget_bytes: float, other_bits: int, supers: list[tuple[int, int]]
) -> dict[tuple[int, int], str] | None:
    """The experts quantize's per-projection LP plan holds at >= PROTECT_BITS at this budget (``quant.plan.
    plan_protection``: super experts, then few-token experts, each group dropped when the budget cannot hold it), or
    None when that plan does not fit the budget."""
    lay = Layout(ckpt)
    sb = scale_dtype_of(ckpt).itemsize
    per = np.array([lay.expert_bytes(w, sb) for w in m.options])
    routed = budget_bytes - lay.fixed_bytes(other_bits, sb)
    if routed < per.min() * len(lay.moe) * lay.E:
        return None
    flagged = [[l, e] for l in lay.moe for e in range(lay.E) if m.counts[l][e] < m.min_tokens]
    return quant_protected(lay, supers, flagged, per, m.options, routed, m.min_tokens)[0]


def _protect_few(
    s: Structure, m: BudgetMeasure, routed_budget: float, quant: dict[tuple[int, int], str] | None = None
) -> tuple[list[list[int]], str | None]:
    """Restrict experts with fewer than ``m.min_tokens`` routed calibration tokens to removal or full width at >=
    PROTECT_BITS (exact layout), in ``s.allowed``, unless the budget cannot hold that. ``(protected, note)``.
    ``quant``: quantize's LP protection at this budget (``quant_protection``; None: its plan does not fit): where
    quantize's plan fits, few-token experts are protected exactly when it protects them, so the program never
    excludes that plan."""
    if s.servable:
        return [], None
    few = [(li, e) for li, l in enumerate(s.moe) for e in range(s.E)
           if m.counts[l][e] < m.min_tokens and (l, e) not in s.supers]  # fmt: skip
    if not few:
        return [], None
    if quant is not None and not any((s.moe[li], e) in quant for li, e in few):
        return [], f"{len(few)} few-token experts not protected: quantize's LP plan does not protect them here"
    high = np.array([o.fraction == 1.0 and min(o.pair) >= PROTECT_BITS for o in s.opts[s.moe[0]][1:]])
    trial = s.allowed.copy()
    for li, e in few:
        trial[li, e, 1:] &= high
    if not trial[:, :, 1:].any(axis=2).all():
        return [], f"{len(few)} few-token experts not protected: no full-width 8-bit option is allowed"
    n = s.L * s.E
    if smallest_bytes(s.nbytes.reshape(n, s.O), s.shape, trial.reshape(n, s.O)) > routed_budget:
        return [], f"{len(few)} few-token experts not protected: the budget cannot hold them at {PROTECT_BITS} bits"
    s.allowed = trial
    return [[s.moe[li], e] for li, e in few], None


class Structure:
    """What a plan may choose, before anything is measured: every expert's options and their exact bytes, the
    allowed choices (super experts: never removed; exact layout: full width at 8 bits, as quant's LP protects them;
    servable layout: options with one width for every projection) and the router's constraints."""

    def __init__(self, ckpt: Checkpoint, servable: bool, other_bits: int, supers: list[tuple[int, int]],
                 fractions: tuple[float, ...], options: tuple[Width, ...] = PAIRS):  # fmt: skip
        self.servable, self.other_bits = servable, other_bits
        self.moe, self.E = list(ckpt.moe_layers), ckpt.num_experts
        moe, E = self.moe, self.E
        self.spec = spec = RouterSpec.from_config(ckpt.family, ckpt.config)
        self.fixed, row_bytes, sb, H = byte_model(ckpt, other_bits)
        self.I = int(ckpt.tensor_info()[ckpt.family.expert_key(moe[0], 0, 0)]["shape"][0])
        self.opts = {l: menu(self.I, fractions, options) for l in moe}
        self.labels = [o.label() for o in self.opts[moe[0]]]
        self.L, self.O = L, O = len(moe), len(self.labels)
        row = [option_bytes(o, H, sb, row_bytes) for o in self.opts[moe[0]]]
        self.nbytes = np.array([row] * (L * E), dtype=np.float64).reshape(L, E, O)
        self.allowed = np.ones((L, E, O), dtype=bool)
        if servable:  # transformers and vLLM read one width per fused experts module
            self.allowed[:, :, 1:] = np.array([o.uniform for o in self.opts[moe[0]][1:]])
        self.supers = {(l, e) for l, e in supers if l in moe}
        for l, e in self.supers:
            self.allowed[moe.index(l), e, 0] = False
            if not servable:
                self.allowed[moe.index(l), e, 1:] = [o.fraction == 1.0 and min(o.pair) >= PROTECT_BITS
                                                     for o in self.opts[l][1:]]  # fmt: skip
        per = E // max(spec.n_group, 1)
        self.shape = Shape(
            np.repeat(np.arange(L), E), np.tile(np.arange(E) // per, L), spec.min_keep(), spec.n_group,
            max(2, -(-spec.top_k // max(spec.topk_group, 1))) if spec.n_group > 1 else 1,
        )  # fmt: skip

    def smallest(self) -> float:
        """The fewest total bytes any plan reaches."""
        L, E, O = self.L, self.E, self.O
        if self.servable:
            routed = L * self.spec.min_keep() * self.nbytes[0, 0, 1:][self.allowed[0, 0, 1:]].min()
        else:
            routed = smallest_bytes(self.nbytes.reshape(L * E, O), self.shape, self.allowed.reshape(L * E, O))
        return self.fixed + routed

    def check_reachable(self, budget_bytes: float, budget_note: str) -> None:
        """A one-line UserError naming the smallest reachable size when the budget is below it."""
        smallest = self.smallest()
        if budget_bytes < smallest:
            raise UserError(
                f"{budget_note} ({_gb(budget_bytes)}) is below the smallest plan this model allows: "
                f"{_gb(smallest)} ({'one layout per model, ' if self.servable else ''}other weights at --other-bits "
                f"{self.other_bits}, at least {self.spec.min_keep()} experts per layer, super experts kept): raise it"
            )


def make_plan(
    ckpt: Checkpoint,
    m: BudgetMeasure,
    kl: dict,
    budget_bytes: float,
    servable: bool,
    other_bits: int,
    supers: list[tuple[int, int]],
    budget_note: str,
    bits_only: bool = False,
) -> dict[str, Any]:
    """The plan (as written to plan.json): every expert's option with its predicted cost and bytes
    (``bits_only``: the quantize-only plan, module docstring)."""
    s = Structure(ckpt, servable, other_bits, supers, m.fractions, m.options)
    moe, E, L, O, opts, nbytes = s.moe, s.E, s.L, s.O, s.opts, s.nbytes
    costs, sens = costs_of(m, ckpt, opts, kl)
    routed_budget = budget_bytes - s.fixed
    if bits_only:
        gran = "layer" if servable else "expert"
        choice, solver, few, protect_note = _quant_lp(ckpt, m, kl, s, budget_bytes, supers, gran)
        why = (
            f"quantize's {'per-layer' if servable else 'per-projection'} LP plan (quant.plan.make_plan, "
            f"--granularity {gran}: full width, no removal)"
        )
        return _plan_dict(s, m, kl, costs, sens, choice, solver, budget_bytes, budget_note, few, protect_note, why)
    quant = None if servable else quant_protection(ckpt, m, budget_bytes, other_bits, supers)
    if quant is not None:  # where quantize's LP plan fits, super experts are held at >= 8 bits only if it holds them
        for l, e in s.supers - set(quant):
            s.allowed[moe.index(l), e, 1:] = True
    few, protect_note = _protect_few(s, m, routed_budget, quant)
    allowed = s.allowed
    try:
        if servable:
            kept = [o for o in range(1, O) if allowed[:, :, o].any()]
            sol = servable_plan(costs, nbytes, routed_budget, s.shape, allowed, kept_options=kept,
                                width_of={o: opts[moe[0]][o].width for o in kept})  # fmt: skip
        else:
            sol = solve(costs.reshape(L * E, O), nbytes.reshape(L * E, O), routed_budget, s.shape,
                        allowed.reshape(L * E, O))  # fmt: skip
    except ValueError as err:
        if "budget" not in str(err):
            raise UserError(f"budget plan: {err}") from None
        s.check_reachable(budget_bytes, budget_note)
        raise UserError(f"budget plan: {err}") from None
    solver = {"name": sol.solver, "solve_s": round(sol.solve_s, 3), **sol.info}
    return _plan_dict(s, m, kl, costs, sens, sol.choice.reshape(L, E), solver, budget_bytes, budget_note, few,
                      protect_note, None)  # fmt: skip


def _quant_lp(
    ckpt: Checkpoint, m: BudgetMeasure, kl: dict, s: Structure, budget_bytes: float, supers: list[tuple[int, int]],
    granularity: str = "expert",
) -> tuple[np.ndarray, dict, list, str | None]:  # fmt: skip
    """``(choice [L, E] into the budget menu, solver facts, protected experts, protect note)`` of quantize's LP plan
    (``quant.plan.make_plan`` at ``granularity`` "expert" (per projection) or "layer", its cost model and
    protection) at ``budget_bytes``, from this measurement's full-width errors (the numbers quantize's measuring
    pass makes)."""
    lay = Layout(ckpt)
    sb = scale_dtype_of(ckpt).itemsize
    qp = quant_make_plan(
        lay, quant_measurement(m, s.moe, kl), m.options, "lp", None, budget_bytes / 1e9, granularity, s.other_bits,
        sb, np.ones((s.L, s.E)), m.min_tokens, "kl", True, supers,
    )  # fmt: skip
    at = {o.pair: j for j, o in enumerate(s.opts[s.moe[0]]) if not o.removed and o.fraction == 1.0}
    choice = np.array([[at[(r["gate_up_bits"], r["down_bits"])] for r in qp["layers"][str(l)]["experts"]]
                       for l in s.moe])  # fmt: skip
    return choice, dict(qp["solver"] or {}), [x[:2] for x in qp["protected"]], qp["protect_note"]


def _plan_dict(
    s: Structure, m: BudgetMeasure, kl: dict, costs: np.ndarray, sens: dict, choice: np.ndarray, solver: dict,
    budget_bytes: float, budget_note: str, few: list, protect_note: str | None, restriction: str | None,
    propagate: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """plan.json of ``choice [L, E]`` (an index into each expert's options); ``propagate``: the write pass
    calibrates later layers' GPTQ on the quantized layers' outputs; by default on the (pruned and cut, unquantized)
    layers' outputs, the inputs the errors were measured on, as quantize writes its LP plans (so a quantize-only plan
    is written with quantize's codes, byte for byte). Measured on the joint exact plans (bench/budget_bench.py):
    KL 0.00134 without vs 0.00140 with propagation on the built-in model at 35%, 0.938 vs 0.956 on stories260k at
    50%."""
    moe, E, opts, nbytes, sup, labels, servable = s.moe, s.E, s.opts, s.nbytes, s.supers, s.labels, s.servable
    layers = {}
    for li, l in enumerate(moe):
        rows = []
        for e in range(E):
            o = opts[l][choice[li, e]]
            rows.append({
                "expert": e, "choice": o.label(), "removed": o.removed, "width": o.width,
                "bits": o.average_bits if not o.removed else 0, "gate_up_bits": o.pair[0], "down_bits": o.pair[1],
                "bytes": int(nbytes[li, e, choice[li, e]]), "predicted_cost": float(costs[li, e, choice[li, e]]),
                "super": (l, e) in sup, "tokens": int(m.counts[l][e]),
                "costs": {lab: float(c) for lab, c in zip(labels, costs[li, e], strict=True)},
            })  # fmt: skip
        layers[str(l)] = {
            "kept_experts": [r["expert"] for r in rows if not r["removed"]],
            "widths": [r["width"] for r in rows if not r["removed"]],
            "bits": [r["bits"] for r in rows if not r["removed"]],
            "experts": rows,
        }
    flat = choice.reshape(-1)
    routed = int(nbytes.reshape(s.L * E, s.O)[np.arange(flat.size), flat].sum())
    return {
        "layout": "servable" if servable else "exact",
        "budget_bytes": int(budget_bytes),
        "budget_rule": budget_note,
        "bytes_counted": "safetensors tensor payload (headers and side files are not counted)",
        "fixed_bytes": int(s.fixed),
        "routed_bytes": routed,
        "total_bytes": int(s.fixed + routed),
        "predicted_cost": float(costs.reshape(s.L * E, s.O)[np.arange(flat.size), flat].sum()),
        "cost_unit": "predicted KL (sum over experts of measured error x the layer's KL calibration)",
        "other_bits": s.other_bits,
        "options": labels,
        "option_bytes": {lab: int(b) for lab, b in zip(labels, nbytes[0, 0], strict=True)},
        "source_width": s.I,
        "source_experts": E,
        "min_keep": s.spec.min_keep(),
        "solver": solver,
        "sensitivity": sens,
        "probe_kl": {f"{l}:{k}": float(v) for (l, k), v in kl.items()},
        "removal_probe": {str(l): v for l, v in m.removal_probe.items()},
        "super_experts": sorted([list(x) for x in sup]),
        "restriction": restriction,
        "propagate_quantized": propagate,
        "protected_few_token": few,
        "protect_rule": f"super experts: never removed{'' if servable else ', full width at >= 8 bits'}; "
        + (
            ""
            if servable
            else f"experts with fewer than {m.min_tokens} routed calibration tokens: removed or full "
            f"width at >= {PROTECT_BITS} bits"
        ),
        "protect_note": protect_note,
        "counts": {lab: int((choice == o).sum()) for o, lab in enumerate(labels)},
        "layers": layers,
    }


__all__ = ["WIDTHS", "bf16_bytes", "byte_model", "costs_of", "make_plan"]
