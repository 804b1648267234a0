"""The cost model: per operation, peak host memory, peak GPU memory, activation-cache disk and time.

Each prediction is a sum of named terms, each a size or an operation count computed from the model's shape and the
calibration settings (``features``), times a coefficient fitted by least squares on measured runs
(``bench/scale_bench.py --ops-sweep`` then ``--fit``; stored in ``coefficients.json`` beside this module with the
command that produced it). Memory terms are bytes, time terms are multiply-adds, weights through the clip
search or expert visits of the MoE forward; the coefficient of a memory term is "copies held at the peak", the
coefficient of a time term is seconds per unit on one CPU thread.

    est = predict(shape, "quantize", samples=128, seq_len=2048, plan="lp", device="cuda")
    est.host_bytes, est.gpu_bytes, est.disk_bytes, est.seconds, est.time_class

The activation-cache disk is not fitted: it follows the engine's spill rule (the cache of T H fp32 values spills to
disk past 4 GiB; HEAPr keeps every layer's inputs and spills once they pass 4 GiB together; the LP plan's codes at
every candidate width, ~17 bits per routed weight, go to files past ``quant.run.code_memory_bound``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from .shape import ModelShape

COEFFICIENTS = Path(__file__).with_name("coefficients.json")
SPILL_BYTES = 4 * 1024**3  # the engine's activation cache spills past this (core/stream.py)
OPS = ("profile", "prune", "atom", "merge", "quantize", "compress")
PROFILE_SIM_TOKENS = 256  # profile --sim-tokens default
MERGE_SIM_TOKENS = 512  # merge --sim-tokens default
ERROR_TOKENS = 4096  # prune --error-tokens default
TIME_CLASSES = ((60.0, "seconds"), (3600.0, "minutes"), (86400.0, "hours"), (math.inf, "days"))
# per-expert state an op holds a bounded share of: quantize's Hessians (HESSIAN_MEMORY_FRACTION of --max-memory,
# else of the device's memory, in chunks of experts) and the LP plan's kept codes (CODE_CACHE_FRACTION; past it,
# GPTQ runs again in the write pass)
CHUNKED = {"hessians": ("quantize-gptq", "quantize-lp"), "codes": ("quantize-lp",)}


def _fractions() -> dict[str, float]:
    from ..quant.layer import HESSIAN_MEMORY_FRACTION
    from ..quant.run import CODE_CACHE_FRACTION

    return {"hessians": HESSIAN_MEMORY_FRACTION, "codes": CODE_CACHE_FRACTION}


# What the fit is pulled towards where the runs cannot tell terms apart (a weak prior, see fit.fit_terms): one copy
# of every memory term, a Python + torch process's baseline, every multiply-add term at one CPU thread's measured
# multiply-add rate (``mac_per_s`` in coefficients.json, measured by the bench that fits) and the clip search term
# at one thread's measured rate of weights through it (``clip_per_s``: elementwise work, ~1,000x a multiply-add).
PRIOR_HOST_CONST = 5e8
HOST_FLOOR = {"layer": 1.0, "acts": 1.0}  # certain: the engine holds one layer and the unspilled cache
# variants whose transforms read the routed experts narrow (core/stream.py): the engine holds them in the
# checkpoint's dtype (bf16: half of float32), the rest of the layer in float32 (a down refit keeps float32 downs).
# merge reads narrow too (since b8b6ce7) but is priced with a float32 layer: the other half stands for the state it
# keeps in temporary files on the CPU (mapped allocations, parked choices, merge/held.py) and in device memory on the
# GPU, which no term counts. Priced narrow, the host fit moved to +2% on the DeepSeek-V3-dims slice (+26% as is) and
# the H200 merge peak to -33% (+5% as is): the float32 price is the safer of the two until GPU runs can fit a term.
NARROW = ("profile", "prune", "prune-reap", "quantize-rtn", "quantize-gptq", "quantize-lp", "atom")
PRIOR_SECONDS_CONST = 2.0
PRIOR_VISIT_SECONDS = 1e-4  # one expert visit of the MoE forward's loop, besides its multiply-adds


def priors(mac_per_s: float, clip_per_s: float | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """(host prior per term, seconds prior per term): see PRIOR_HOST_CONST. Without ``clip_per_s`` the clip term
    is priced as one multiply-add per weight (the fits before it was measured)."""
    names = ("layer", "acts", "sim", "err", "cache", "downs", "hidden", "align", "codes", "hessians", "G")
    host = {n: 1.0 for n in names}
    timed = ("fwd", "sim", "search", "miss", "refit", "downfit", "svd", "gptq", "hessians", "grads", "score")
    secs = {n: 1.0 / mac_per_s for n in timed}
    secs["clip"] = 1.0 / (clip_per_s or mac_per_s)
    secs["visits"] = PRIOR_VISIT_SECONDS
    return {"const": PRIOR_HOST_CONST, **host}, {"const": PRIOR_SECONDS_CONST, **secs}


def time_class(seconds: float) -> str:
    return next(name for bound, name in TIME_CLASSES if seconds < bound)


@dataclass(frozen=True)
class Settings:
    """Calibration and op settings a prediction depends on (the CLI's options)."""

    samples: int = 64
    seq_len: int = 256
    batch_size: int = 8
    device: str = "cpu"
    method: str | None = None
    refit: str | None = None
    plan: str = "lp"
    hessian: str = "full"
    sim_tokens: int | None = None
    error_tokens: int = ERROR_TOKENS
    profile_reused: bool = False
    stages: tuple[str, ...] = ()
    max_memory: int | None = None
    memory: int | None = None  # the memory of the machine (or GPU) the op runs on: it sizes chunks without --max-memory
    # the LP plan's codes past quant.run.code_memory_bound go to files as they are made (since commit 924ac33);
    # False: the rule before, every layer's codes held in memory up to CODE_CACHE_FRACTION of the limit
    codes_spill: bool = True
    # the engine holds the routed experts in the checkpoint's dtype (NARROW variants); False: in float32, as atom
    # did before commit 007f81c (measured runs of that code); None: the variant's rule
    narrow: bool | None = None

    @property
    def tokens(self) -> int:
        return self.samples * self.seq_len


def prune_refit(s: Settings) -> str:
    """The refit a prune runs: --refit, else the CLI's default for the method (prune.transform.default_refit: a down
    refit after output error, none after the score methods)."""
    if s.refit is not None:
        return s.refit
    from ..prune.transform import default_refit

    return default_refit(s.method or "output-error")


def sim_tokens(var: str, s: Settings) -> int:
    """Tokens a variant's output similarity is measured on: ``sim_tokens`` when given, else the op's default (a
    profile 256, merge 512; prune's own profile pass none, since commit 1026905: nothing in prune reads it). 0: no
    similarity term."""
    if s.sim_tokens is not None:
        return s.sim_tokens
    if var == "merge":
        return MERGE_SIM_TOKENS
    return 0 if var.startswith("prune") else PROFILE_SIM_TOKENS


def variant(op: str, s: Settings) -> str:
    """The fitted model an op and its settings use (one coefficient set per variant)."""
    if op == "prune":
        if s.method not in (None, "output-error"):
            return "prune-reap"  # every profile-score method costs a profile pass and a sort
        # a down refit (the default) is the "prune" variant's downs/hidden/downfit terms (features)
        return "prune-refit" if prune_refit(s) in ("router", "router+down") else "prune"
    if op == "quantize":
        if s.method == "rtn":
            return "quantize-rtn"
        return "quantize-lp" if s.plan == "lp" else "quantize-gptq"
    return op


def features(shape: ModelShape, var: str, s: Settings) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """(memory terms in bytes, of which per-expert state that --max-memory may chunk, time terms) of one variant."""
    H, E, I, k = shape.hidden, shape.experts, shape.width, shape.top_k
    L, Lm, T = shape.layers, shape.moe_layers, s.tokens
    Tb = min(T, s.batch_size * s.seq_len)
    acts = 4.0 * T * H  # the activation cache, fp32 [T, H]
    acts_mem = acts if acts <= SPILL_BYTES else 4.0 * Tb * H * 2
    moe_part = shape.layer_params - shape.attn_params  # the largest layer's MLP part: the MoE block unless dense wins
    routed = shape.moe_layer_params if shape.moe_layers and moe_part >= shape.moe_layer_params else 0
    narrow = var in NARROW if s.narrow is None else s.narrow
    held = shape.dtype_bytes if narrow else 4  # routed experts in the checkpoint's dtype, or float32
    layer = 4.0 * (shape.layer_params - routed) + min(4, held) * routed  # the one decoder layer the engine holds
    fwd = L * T * shape.active_params_per_token + L * T * s.seq_len * H  # multiply-adds of a pass
    mem: dict[str, float] = {"const": 1.0, "layer": layer, "acts": acts_mem}
    state: dict[str, float] = {}
    # the MoE forward visits each expert a batch hits one by one (index, three small products, index_add): work per
    # visit besides its multiply-adds, which the runs at 64-256 experts show (E256's profile took 1.5x E16's+fwd)
    visits = Lm * E * math.ceil(T / Tb)
    tim: dict[str, float] = {"const": 1.0, "fwd": fwd, "visits": visits}
    expert_fwd = 3.0 * H * I  # multiply-adds of one expert on one token
    sim = sim_tokens(var, s)
    if var in ("profile", "prune", "prune-reap", "prune-refit"):
        mem["sim"] = 4.0 * sim * E * H
        tim["sim"] = Lm * sim * E * expert_fwd
    if var in ("prune", "prune-refit"):
        err = min(s.error_tokens, T)
        cached = search_slots(shape, var, s)  # each sampled token's cached expert outputs (prune/transform.py)
        mem["err"] = 4.0 * err * cached * H
        tim["search"] = Lm * err * E * expert_fwd
        # a cache bounded below the k+1 outputs a refresh gathers per token recomputes the rest on every refresh:
        # the first pass over every token, then one per removal over the tokens it can move ((k+1)/E of them, about
        # E/2 removals at the default ratio): (1 + (k+1)/2) passes of (k+1 - slots) expert forwards per token
        missing = max(0, min(E, k + 1) - cached)
        if missing:
            tim["miss"] = Lm * err * missing * expert_fwd * (1.0 + (k + 1) / 2.0)
    if var == "prune" and prune_refit(s) == "down":  # the default refit of the kept down projections (prune/refit)
        err = min(s.error_tokens, T)
        mem["downs"] = 4.0 * E * H * I  # the kept experts' refitted downs, float32 (at most every expert's)
        mem["hidden"] = 4.0 * err * search_slots(shape, var, s) * I  # the sampled tokens' activations fit_downs reads
        tim["downfit"] = Lm * (err * k * I * (H + I) + E * I**3)  # per kept expert: Gram, targets, ridge solve
    if var == "prune-refit":
        mem["cache"] = 4.0 * T * k * H
        tim["refit"] = Lm * T * E * H
    if var == "merge":
        mem["sim"] = 4.0 * sim * E * H
        mem["align"] = 4.0 * E * I * I
        tim["sim"] = Lm * sim * E * expert_fwd
        tim["svd"] = Lm * E * H * I * min(H, I)
    if var.startswith("quantize"):
        # every routed weight through the clip search (quant/rtn.py: the codes at each of seven shrink factors and
        # their error, elementwise) once per width it is quantized at: the LP plan's measuring pass at every
        # candidate width, RTN and GPTQ at one (GPTQ searches its groups' scales the same way)
        tim["clip"] = Lm * shape.moe_layer_params * (len(lp_widths()) if var == "quantize-lp" else 1)
    if var == "quantize-rtn":
        mem["codes"] = 1.0 * shape.moe_layer_params
    if var in ("quantize-gptq", "quantize-lp"):
        state["hessians"] = 4.0 * E * (H * H + I * I)  # [E, H, H] + [E, I, I] fp32
        tim["gptq"] = Lm * E * I * H * (2.0 * H + I)
        tim["hessians"] = Lm * T * k * (H * H + I * I)
    if var == "quantize-lp":
        codes, bound = lp_codes(shape, s)
        mem["codes"] = codes if (codes <= bound or not s.codes_spill) else 0.0  # past the bound: in files
    if var == "atom":
        every = 4.0 * (L + 1) * T * H  # every layer's inputs (and gradients), spilled together past 4 GiB
        mem["acts"] = every if every <= SPILL_BYTES else acts_mem
        state["G"] = 4.0 * E * H * H if s.hessian == "full" else 4.0 * E * H * (I if s.hessian == "diag" else 64)
        tim["grads"] = Lm * T * k * H * H if s.hessian == "full" else Lm * T * k * H * I
        tim["score"] = Lm * E * I * H * (H if s.hessian == "full" else 1)
    mem.update(state)
    return mem, state, tim


def search_slots(shape: ModelShape, var: str, s: Settings) -> int:
    """Expert outputs per sampled token the output-error search caches (prune/transform.py): k+4 (k+2 for the router
    refit's variant), at most E, fewer where ``prune.order.cache_slots`` bounds them by the layer's size or
    --max-memory (the DeepSeek-V3-dims slice: 4 of 12)."""
    from ..prune.order import cache_slots

    E, H, I, k = shape.experts, shape.hidden, shape.width, shape.top_k
    err = max(1, min(s.error_tokens, s.tokens))
    if var != "prune":
        return min(E, k + 2)
    down = prune_refit(s) == "down"
    slot_bytes = err * (H + (I if down else 0)) * 4
    return min(E, cache_slots(k + 4, slot_bytes, 3 * E * H * I * shape.dtype_bytes, s.max_memory))


def lp_widths() -> tuple[int, ...]:
    """The LP plan's candidate widths: its measuring pass quantizes every routed weight at each."""
    from ..quant.plan import WIDTHS

    return tuple(WIDTHS)


def lp_codes(shape: ModelShape, s: Settings) -> tuple[float, float]:
    """(bytes of every MoE layer's codes at every candidate width, as the LP's measuring pass keeps them for the
    write pass; the bytes it may hold in memory: quant.run.code_memory_bound for this model and limit)."""
    from ..quant.layer import PackedCodes
    from ..quant.run import code_memory_bound

    codes = float(PackedCodes.estimate(shape.moe_layer_params, lp_widths())) * shape.moe_layers
    limit = s.max_memory if s.max_memory is not None else s.memory
    layer_bytes = shape.dtype_bytes * shape.moe_layer_params
    return codes, float(code_memory_bound(layer_bytes, limit if limit is not None else 2**62))


def disk_bytes(shape: ModelShape, var: str, s: Settings) -> int:
    """Activation-cache bytes spilled to disk at the peak (the engine's rule, not fitted), and the LP plan's codes
    past their memory bound (quant/codecache.py: every layer's, until the write pass has read them)."""
    acts = 4 * s.tokens * shape.hidden
    if var == "atom":
        every = 2 * (shape.layers + 1) * acts  # inputs and gradients of every layer
        return every if every // 2 > SPILL_BYTES else 0
    cache = 2 * acts if acts > SPILL_BYTES else 0  # inputs and the next layer's outputs
    if var == "quantize-lp" and s.codes_spill:
        codes, bound = lp_codes(shape, s)
        cache += int(codes) if codes > bound else 0
    return cache


@lru_cache(maxsize=4)
def _load(path: str) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def coefficients(path: Path | None = None) -> dict[str, Any]:
    """The fitted coefficients (``coefficients.json``): {"ops": {variant: {"host": {...}, "seconds": {...}}}}."""
    return _load(str(path or COEFFICIENTS))


@dataclass(frozen=True)
class Estimate:
    op: str
    variant: str
    host_bytes: int
    gpu_bytes: int
    disk_bytes: int
    seconds: float
    terms: dict[str, float] = field(default_factory=dict)  # host bytes per term (what dominates)

    @property
    def time_class(self) -> str:
        return time_class(self.seconds)


def _apply(coef: dict[str, float], terms: dict[str, float]) -> dict[str, float]:
    return {name: coef.get(name, 0.0) * value for name, value in terms.items()}


def predict_variant(shape: ModelShape, var: str, s: Settings, coefs: dict[str, Any] | None = None) -> Estimate:
    """One fitted variant: host/GPU peak, disk, one-thread CPU seconds."""
    c = (coefs or coefficients())["ops"][var]
    mem, state, tim = features(shape, var, s)
    host = _apply(c["host"], mem)
    seconds = sum(_apply(c["seconds"], tim).values())
    limit = s.max_memory if s.max_memory is not None else s.memory
    chunked = {**CHUNKED, "codes": ()} if s.codes_spill else CHUNKED  # spilled codes: bounded in features()
    if limit is not None:  # bounded per-expert state: a share of the limit, never below one expert's
        for name, frac in _fractions().items():
            if var in chunked[name] and name in host and host[name] > frac * limit:
                host[name] = max(frac * limit, host[name] / shape.experts)
    gpu = 0.0
    if s.device.startswith("cuda"):  # the layer, its per-expert state and (unspilled) cache live on the GPU
        gpu = sum(v for n, v in host.items() if n != "const")
        host = {"const": host["const"], "read": 1.0 * shape.dtype_bytes * shape.layer_params}
    return Estimate("", var, int(sum(host.values())), int(gpu), disk_bytes(shape, var, s), float(seconds), host)


def predict(shape: ModelShape, op: str, coefs: dict[str, Any] | None = None, **settings: Any) -> Estimate:
    """Predict one operation (``op`` in OPS) with the CLI's settings (samples, seq_len, batch_size, device, method,
    refit, plan, hessian, sim_tokens, error_tokens, profile_reused, stages, max_memory, memory)."""
    if op not in OPS:
        raise ValueError(f"unknown operation {op!r}: use one of {', '.join(OPS)}")
    known = {k: v for k, v in settings.items() if k in Settings.__dataclass_fields__ and v is not None}
    if "stages" in known:
        known["stages"] = tuple(known["stages"])
    s = Settings(**known)
    if op != "compress":
        est = predict_variant(shape, variant(op, s), s, coefs)
        if s.profile_reused and op == "prune":  # the profile pass (prune's own: no similarity) is not run again
            prof = predict_variant(shape, "profile", _replace_settings(s, sim_tokens=sim_tokens(est.variant, s)), coefs)
            est = _replace(est, seconds=max(est.seconds - prof.seconds + _const_seconds(coefs), _const_seconds(coefs)))
        return _replace(est, op=op)
    # compress: a profile pass (unless reused), then one engine pass running every stage's transform per layer; its
    # own profile pass measures output similarity only for a merge stage (compress/run.py), as prune's (no
    # similarity) otherwise: the prune stage's own-profile share (subtracted below) is priced the same way
    one_pass = _replace_settings(s, plan="uniform")  # a compress quantize stage is uniform (no global LP plan)
    stages = [variant(st, one_pass) for st in (s.stages or ("prune",))]
    if s.sim_tokens is None:
        s = _replace_settings(s, sim_tokens=PROFILE_SIM_TOKENS if "merge" in stages else 0)
    parts = [predict_variant(shape, v, s if v != "merge" else _replace_settings(s, sim_tokens=None), coefs)
             for v in stages]  # fmt: skip
    prof = predict_variant(shape, "profile", s, coefs)
    base = _const_seconds(coefs)
    seconds = base + (0.0 if s.profile_reused else prof.seconds - base)
    for v, p in zip(stages, parts, strict=True):  # a measured prune includes its own profile pass
        seconds += p.seconds - base - (prof.seconds - base if v.startswith("prune") else 0.0)
    host = max(p.host_bytes for p in [*parts, prof])
    gpu = max(p.gpu_bytes for p in [*parts, prof])
    disk = max(p.disk_bytes for p in parts)
    return Estimate("compress", "+".join(stages), host, gpu, disk, max(seconds, base), {})


def _const_seconds(coefs: dict[str, Any] | None) -> float:
    return float((coefs or coefficients())["ops"]["profile"]["seconds"].get("const", 0.0))


def _replace_settings(s: Settings, **kw: Any) -> Settings:
    from dataclasses import replace

    return replace(s, **kw)


def _replace(est: Estimate, **kw: Any) -> Estimate:
    from dataclasses import replace

    return replace(est, **kw)
