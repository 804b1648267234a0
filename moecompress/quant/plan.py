"""The bit plan of `moecompress quantize`: which weights are routed experts (``Layout``, with the bytes of every
width), expert importance, the layer sensitivities measured by the probes, and ``make_plan`` (uniform, or the
global LP of quant/bitplan.py over the measured errors). Bad plans are refused with a UserError naming the flag.

Per-expert LP plans (``--granularity expert``) choose per-projection options: gate/up at one width and down_proj
at another (``OPTIONS``, e.g. 2-bit gate/up with a 4-bit down_proj: 2.67 bits per weight), each with its real bytes.
Layer plans choose one width for all three projections (``WIDTHS``: every routed module of a layer alike).

The plan's cost predicts KL (``cost_model="kl"``, default): each layer's errors are scaled by one factor so that
their sum at the lowest probed width equals the layer's measured KL with its routed experts at that width (the
probes of ``MeasureTransform``). Super experts and experts with too few calibration tokens get >= 8 bits in LP plans
(``protect``; the plan lists them and why).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..core.checkpoint import DTYPE_BYTES, Checkpoint
from ..core.errors import UserError
from . import keys
from .bitplan import allocate_bits_detailed
from .layer import Width, expert_group_sizes, split_width
from .rtn import SUPPORTED_BITS, group_size_for, quantized_nbytes
from .transform import scale_dtype_for

WIDTHS = SUPPORTED_BITS  # candidate widths of the LP, (2, 3, 4, 8)
# per-expert LP plans: (gate/up bits, down bits). Measured (bench/quant_bench.py): the built-in model's KL is set by
# down_proj (2-bit gate/up + 4-bit down, 2.67 bits per weight, is near uniform 3-bit), the validation model's more
# by gate/up; per-projection options let the LP buy the cheap one on each
OPTIONS: tuple[tuple[int, int], ...] = tuple((bg, bd) for bg in WIDTHS for bd in WIDTHS)
OTHER_BITS = (2, 3, 4, 8, 16)
PROBE_WIDTHS = (2, 3, 4)  # widths whose per-layer KL is measured (sensitivity of the plan cost)
PROTECT_BITS = 8  # super experts and experts with too few calibration tokens get at least this many bits


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def scale_dtype_of(ckpt: Checkpoint) -> torch.dtype:
    """The dtype of the quantization scales of ``ckpt``'s output (its model dtype; bf16 if unknown)."""
    return scale_dtype_for(ckpt.config)


class Layout:
    """Which checkpoint keys are routed experts, which other weights get --other-bits, which stay as they are."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        fam = ckpt.family
        self.fam = fam
        self.moe = list(ckpt.moe_layers)
        self.E = ckpt.num_experts
        self.info = ckpt.tensor_info()
        self.routed: dict[str, tuple[int, int, int]] = {}  # key -> (layer, expert, proj) (output names)
        self.fused = {k for l in self.moe for k in keys.fused_keys(fam, l)}  # Llama-4's disk tensors they replace
        for l in self.moe:
            for e in range(self.E):
                for proj in range(3):
                    k = keys.expert_key(fam, l, e, proj)
                    if k not in self.info and not self.fused:
                        raise UserError(f"{k} is missing: moecompress quantize needs the hub per-expert layout")
                    self.routed[k] = (l, e, proj)
        self.I, self.H = keys.expert_info(ckpt, self.moe[0], 0)[0]
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

    def expert_bytes(self, bits: float | tuple[int, int], scale_bytes: int) -> float:
        """Bytes of one routed expert (3 projections) at ``bits`` (fractional: payload bits x params), or at a
        per-projection option ``(gate/up bits, down bits)``."""
        g_h, g_i = expert_group_sizes(self.H, self.I)
        if isinstance(bits, tuple):
            bg, bd = bits
            return 2 * quantized_nbytes(self.I, self.H, bg, g_h, scale_bytes) + quantized_nbytes(
                self.H, self.I, bd, g_i, scale_bytes
            )
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
            if k in self.routed or k in self.fused:
                continue
            if k in self.other and other_bits < 16:
                r, c = v["shape"]
                total += quantized_nbytes(r, c, other_bits, group_size_for(c), scale_bytes)
            else:
                total += _numel(v["shape"]) * DTYPE_BYTES.get(v["dtype"], 4)
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
    "kl": "predicted KL: err[l,e,w] x s[l], s[l] = measured KL with layer l's routed experts at the lowest probed "
    "width p / sum_e err[l,e,p] (one factor per layer for every width and option)",
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


def option_sensitivity(
    moe: list[int], widths: tuple[Width, ...], err: np.ndarray, probe_kl: dict[tuple[int, int], float] | None
) -> np.ndarray:
    """``s [L]``: one factor per layer, its measured KL with every routed expert at the lowest probed width p
    divided by its summed block-output error at p (``err [L, E, len(widths)]``; p is the width p or the option
    (p, p)). Ones without probes; a layer without a usable probe gets the median factor of the others.

    One factor for all widths keeps a layer's options in the ratio of their measured errors: per-width factors
    (``layer_sensitivity``) priced per-projection options worse on both bench models (bench/quant_bench.py)."""
    L = len(moe)
    s = np.full(L, np.nan)
    if not probe_kl:
        return np.ones(L)
    for li, l in enumerate(moe):
        probed = sorted(b for (ll, b) in probe_kl if ll == l)
        for p in probed:
            j = next((j for j, w in enumerate(widths) if w == p or w == (p, p)), None)
            if j is None:
                continue
            tot = err[li, :, j].sum()
            if tot > 0:
                s[li] = max(probe_kl[(l, p)], 0.0) / tot
            break
    ok = np.isfinite(s)
    return np.where(ok, s, np.median(s[ok]) if ok.any() else 1.0)


def width_label(w: Width) -> str:
    """``"3"`` for a width, ``"2/4"`` for gate/up at 2 bits and down_proj at 4."""
    bg, bd = split_width(w)
    return str(bg) if bg == bd else f"{bg}/{bd}"


def average_bits(w: Width) -> float:
    """Payload bits per weight of an expert at a width or option (gate/up are 2/3 of its weights)."""
    bg, bd = split_width(w)
    return bg if bg == bd else round((2 * bg + bd) / 3, 4)


def make_plan(
    lay: Layout,
    meas: dict[str, Any],
    widths: tuple[Width, ...],
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

    ``widths``: the measured widths (ints) or per-projection options ``(gate/up bits, down bits)``; layer plans
    take only options with one width for all projections.

    ``cost_model='kl'``: cost[l, e, w] = s[l] * err[l, e, w], with the layer factor s[l] = (measured KL with all of
    layer l's experts at the lowest probed width p) / (sum of err[l, :, p]) (:func:`option_sensitivity`), so costs
    across layers are in one unit (predicted KL). ``'err'``: the raw block-output error.
    ``protect``: super experts (``supers``) and experts with fewer than ``min_tokens`` routed tokens get at least
    PROTECT_BITS bits in LP plans (they leave their layer's tie with --granularity layer)."""
    L, E = len(lay.moe), lay.E
    per_width, nbytes, fixed, budget = _bytes(lay, widths, bits, budget_gb, other_bits, scale_bytes)
    costs, flagged, sens = option_costs(lay, meas, widths, importance, min_tokens, cost_model)
    protected: dict[tuple[int, int], str] = {}
    protect_note = None
    if protect and plan == "lp":
        protected, protect_note = plan_protection(lay, supers, flagged, per_width, widths, budget, min_tokens)
    choice, solver = _choose(lay, plan, granularity, widths, bits, costs, nbytes, budget, protected)
    chosen_bits = np.array([average_bits(widths[c]) for c in choice]).reshape(L, E)
    routed_bytes = int(nbytes[np.arange(L * E), choice].sum())
    return {
        "plan": plan,
        "granularity": granularity if plan == "lp" else "layer",
        "widths": [width_label(w) for w in widths],
        "target_bits": bits,
        "budget_gb": budget_gb,
        "budget_bytes_routed": float(budget),
        "routed_bytes": routed_bytes,
        "fixed_bytes": int(fixed),
        "total_bytes": int(fixed + routed_bytes),
        "average_bits_routed": float(chosen_bits.mean()),
        "predicted_cost": None if costs is None else float(costs[np.arange(L * E), choice].sum()),
        "other_bits": other_bits,
        "few_token_experts": flagged,
        "cost_model": cost_model if costs is not None else None,
        "cost_model_rule": COST_RULES.get(cost_model) if costs is not None else None,
        "sensitivity": None if sens is None else {str(l): float(sens[li]) for li, l in enumerate(lay.moe)},
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
        "width_counts": {width_label(w): int((choice == j).sum()) for j, w in enumerate(widths)},
        "layers": _layer_rows(lay, meas, widths, choice, nbytes, costs, importance, protected),
    }


def _bytes(
    lay: Layout, widths: tuple[Width, ...], bits: float | None, budget_gb: float | None, other_bits: int, sb: int
) -> tuple[np.ndarray, np.ndarray, int, float]:
    """``(per_width [B], nbytes [N, B], fixed bytes, routed-expert budget)``; an impossible --budget-gb is refused."""
    L, E = len(lay.moe), lay.E
    per_width = np.array([lay.expert_bytes(b, sb) for b in widths])  # [B]
    nbytes = np.tile(per_width, (L * E, 1))  # [N, B]
    fixed = lay.fixed_bytes(other_bits, sb)
    if bits is not None:
        return per_width, nbytes, fixed, L * E * lay.expert_bytes(bits, sb)
    assert budget_gb is not None
    budget = budget_gb * 1e9 - fixed
    smallest = fixed + nbytes.min(axis=1).sum()
    if budget < nbytes.min(axis=1).sum():
        raise UserError(
            f"--budget-gb {budget_gb:g} is below the smallest possible model ({smallest / 1e9:.4f} GB with every "
            f"routed expert at {min(widths)} bits and other weights at --other-bits {other_bits}): raise it"
        )
    return per_width, nbytes, fixed, budget


def option_costs(
    lay: Layout, meas: dict[str, Any], widths: tuple[Width, ...], importance: np.ndarray, min_tokens: int, model: str
) -> tuple[np.ndarray | None, list[list[int]], np.ndarray | None]:
    """``(costs [N, B] or None without measured errors, few-token experts [[layer, expert]], sensitivity [L])``;
    a few-token expert's error is its layer's median measured error."""
    err, counts = meas["err"], meas["counts"]
    flagged: list[list[int]] = []
    if err is None:
        return None, flagged, None
    L, E = len(lay.moe), lay.E
    e2 = err.copy()  # [L, E, B]
    for li in range(L):
        low = counts[li] < min_tokens
        flagged += [[lay.moe[li], int(e)] for e in np.where(low)[0]]
        if low.any() and (~low).any():  # unreliable measurement: use the layer's median measured error
            e2[li, low] = np.median(e2[li, ~low], axis=0)
    sens = None
    if model == "kl":
        sens = option_sensitivity(lay.moe, widths, e2, meas.get("probe_kl"))
        e2 = e2 * sens[:, None, None]
    return (importance[:, :, None] * e2).reshape(L * E, len(widths)), flagged, sens


def plan_protection(
    lay: Layout,
    supers: list[tuple[int, int]] | tuple,
    flagged: list[list[int]],
    per_width: np.ndarray,
    widths: tuple[Width, ...],
    budget: float,
    min_tokens: int,
) -> tuple[dict[tuple[int, int], str], str | None]:
    """Experts held at >= PROTECT_BITS and why (super experts first; none the budget cannot hold), and a note."""
    protected: dict[tuple[int, int], str] = {}
    for l, e in supers:
        if l in lay.moe:
            protected[(l, e)] = "super expert"
    for l, e in flagged:
        protected.setdefault((l, e), f"fewer than {min_tokens} calibration tokens")
    note = None
    floor = per_width.min() * len(lay.moe) * lay.E  # every expert at the lowest width
    high = per_width[np.array([min(split_width(w)) >= PROTECT_BITS for w in widths])]
    extra = high.min() - per_width.min() if high.size else np.inf  # one expert raised to 8 bits
    if protected and floor + len(protected) * extra > budget:  # the budget cannot hold them: keep super experts
        dropped = [k for k, why in protected.items() if why != "super expert"]
        protected = {k: why for k, why in protected.items() if why == "super expert"}
        note = f"{len(dropped)} few-token experts not protected: the budget cannot hold them at 8 bits"
        if floor + len(protected) * extra > budget:
            protected, note = {}, "no expert protected: the budget cannot hold the super experts at 8 bits"
    return protected, note


def _choose(
    lay: Layout,
    plan: str,
    granularity: str,
    widths: tuple[Width, ...],
    bits: float | None,
    costs: np.ndarray | None,
    nbytes: np.ndarray,
    budget: float,
    protected: dict[tuple[int, int], str],
) -> tuple[np.ndarray, dict[str, Any] | None]:
    """``(choice [N] width index per expert, solver facts or None)``: --bits for every expert, or the global LP."""
    L, E = len(lay.moe), lay.E
    if plan == "uniform":
        b = int(bits or 0)
        return np.full(L * E, next(j for j, w in enumerate(widths) if split_width(w) == (b, b))), None
    if costs is None:
        raise UserError("--plan lp needs calibration data to measure errors")
    pairs = [split_width(w) for w in widths]
    allowed = np.ones((L * E, len(widths)), dtype=bool)
    if granularity == "layer":  # one width for every routed module of a layer
        allowed[:] = np.array([bg == bd for bg, bd in pairs])
    for l, e in protected:
        allowed[lay.moe.index(l) * E + e] &= np.array([min(p) >= PROTECT_BITS for p in pairs])
    groups = None
    if granularity == "layer":  # protected experts leave their layer's tie (their own item)
        groups = np.repeat(np.arange(L), E)
        for n, (l, e) in enumerate(protected):
            groups[lay.moe.index(l) * E + e] = L + n
    try:
        res = allocate_bits_detailed(costs, nbytes, budget, groups, allowed=allowed)
    except ValueError as err:
        msg = str(err).replace("raise the budget", "raise --bits / --budget-gb")
        raise UserError(msg.replace("plan per expert", "use --granularity expert")) from None
    return res.choice, {"name": res.solver, "status": res.status, "solve_s": round(res.solve_s, 3), **res.info}


def _layer_rows(
    lay: Layout,
    meas: dict[str, Any],
    widths: tuple[Width, ...],
    choice: np.ndarray,
    nbytes: np.ndarray,
    costs: np.ndarray | None,
    importance: np.ndarray,
    protected: dict[tuple[int, int], str],
) -> dict[str, Any]:
    """bit_plan.json "layers": per layer its widths and one row per expert."""
    err, counts, E = meas["err"], meas["counts"], lay.E
    layers = {}
    for li, l in enumerate(lay.moe):
        rows = []
        for e in range(E):
            n = li * E + e
            w = widths[choice[n]]
            bg, bd = split_width(w)
            rows.append(
                {
                    "expert": e,
                    "bits": average_bits(w),  # payload bits per weight
                    "gate_up_bits": bg,
                    "down_bits": bd,
                    "bytes": int(nbytes[n, choice[n]]),
                    "predicted_cost": None if costs is None else float(costs[n, choice[n]]),
                    "err": None
                    if err is None
                    else {width_label(o): float(err[li, e, j]) for j, o in enumerate(widths)},
                    "tokens": None if counts is None else int(counts[li, e]),
                    "method": meas["used"][l][e],
                    "importance": float(importance[li, e]),
                    "protected": protected.get((l, e)),
                }
            )
        layers[str(l)] = {"bits": sorted({r["bits"] for r in rows}), "experts": rows}
    return layers


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
