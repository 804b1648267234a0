"""`moecompress quantize`: routed experts to 2/3/4/8 bits (GPTQ or RTN) with a uniform or global LP bit plan,
written as a compressed-tensors pack-quantized checkpoint + bit_plan.json + moecompress.json (layout "quantized").

Three modes, each a short function over the engine (quant/transform.py):

- uniform (``--plan uniform``): ONE pass of ``QuantTransform(bits)``; the writer gets each layer as it finishes.
- LP (``--plan lp``): the plan needs every layer's measurements first, so two passes: ``MeasureTransform`` (errors
  at every candidate width, token counts, sensitivity probes), ``make_plan`` (quant/plan.py), then
  ``QuantTransform(plan)`` writes each expert at its planned width. The measuring pass keeps every width's codes,
  packed as written (2 + 3 + 4 + 8 bits per weight), and the write pass then just streams the layers through (no
  windows). In memory when they fit in half of --max-memory (else half of the host's available memory) and in a
  quarter of one MoE layer's routed weights or 256 MiB (``code_memory_bound``; ``max_cache_bytes`` overrides, 0:
  none kept); above it they go to temporary files as each expert is quantized (quant/codecache.py, quant/
  rowfile.py: no layer's codes in memory, the probes and the write pass read the rows they use; where the
  temporary disk has twice their size free); otherwise (or with propagation) the write pass quantizes again on the
  same inputs: the same codes.
- plan only (``--plan-only``): the measurement and the plan, written to OUTPUT/bit_plan.json.

GPTQ (quant/gptq.py, quant/layer.py): static act-order with the plain group layout, Hessian-diagonal-weighted scale
search, router-weighted Hessians, gate/up before down_proj (whose Hessian comes from the quantized gate/up outputs).
By default the next layer's inputs come from the original weights (``GPTQOptions.propagate`` off: measured no
better); with it, from the quantized layer (sequential calibration, what ``compress`` does). Attention / shared
experts / dense MLPs are quantized with RTN at ``--other-bits`` (16 keeps them); routers, norms, embeddings and
lm_head never are. Heavy math runs on ``device``, one expert at a time.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..calibration.sets import TokenSet
from ..core.checkpoint import Checkpoint
from ..core.engine import Engine
from ..core.errors import UserError
from ..core.job import Job
from ..core.manifest import Manifest
from ..core.output import Output
from ..core.writer import atomic_dir
from . import keys
from .layer import GPTQOptions, Width, split_width
from .mxfp4 import check_options, run_mxfp4, writes_mxfp4
from .plan import (  # noqa: F401  (Layout, layer_sensitivity, option_sensitivity, scale_dtype_of: the bench's API)
    OPTIONS,
    OTHER_BITS,
    PROBE_WIDTHS,
    WIDTHS,
    Layout,
    _importance,
    _super_experts,
    _validate,
    layer_sensitivity,
    make_plan,
    option_sensitivity,
    scale_dtype_of,
)
from .transform import DTYPES, MeasureTransform, PackedCodes, QuantTransform

CODE_CACHE_FRACTION = 0.5  # of --max-memory, else of the host's available memory: the LP's kept codes
# ... and of one MoE layer's routed weights (as on disk), at least CODE_MEMORY_FLOOR: the codes at every candidate
# width are ~17 bits per weight, more than a bf16 layer, so held in memory they alone would pass the bound of
# 2.5 layers (Qwen3-30B layer: 1.19 GB beside 1.2 GB); past this they go to files as they are made
CODE_LAYER_FRACTION = 0.25
CODE_MEMORY_FLOOR = 256 * 2**20


def code_cache_bound() -> int:
    """Bytes the measuring pass may keep in codes for the write pass by the memory limit (see the module doc)."""
    from ..core.limits import host_available_bytes, memory_limit

    limit = memory_limit()
    return int((limit if limit is not None else host_available_bytes()) * CODE_CACHE_FRACTION)


def code_memory_bound(layer_bytes: int, limit: int | None = None) -> int:
    """Bytes of codes the measuring pass may hold in memory: :func:`code_cache_bound` (``CODE_CACHE_FRACTION`` of
    ``limit`` when given: the cost model's machine), and at most ``CODE_LAYER_FRACTION`` of one MoE layer's routed
    weights (``layer_bytes``) or ``CODE_MEMORY_FLOOR``."""
    cache = code_cache_bound() if limit is None else int(limit * CODE_CACHE_FRACTION)
    return min(cache, max(CODE_MEMORY_FLOOR, int(CODE_LAYER_FRACTION * layer_bytes)))


@dataclass(frozen=True)
class QuantOptions:
    """Every choice of one quantize run (the CLI flags); ``check()`` refuses bad ones before any work."""

    bits: float | None = None
    budget_gb: float | None = None
    plan: str = "lp"
    method: str = "gptq"
    granularity: str = "layer"
    other_bits: int = 8
    plan_only: bool = False
    profile: str | Path | None = None
    importance: str = "uniform"
    calib: str = "mixed"
    samples: int = 32
    seq_len: int = 256
    seed: int = 0
    batch_size: int = 8
    min_tokens: int = 32
    device: torch.device | None = None
    overwrite: bool = False
    command: str | None = None
    opts: GPTQOptions = field(default_factory=GPTQOptions)
    cost_model: str = "kl"
    protect: bool = True
    max_cache_bytes: int | None = None  # codes in memory up to this, past it in files (code_memory_bound); 0: none kept

    def check(self) -> None:
        _validate(self.bits, self.budget_gb, self.plan, self.method, self.granularity, self.other_bits)

    @property
    def widths(self) -> tuple[Width, ...]:
        """Measured widths: per-projection options for per-expert LP plans, one width per layer otherwise."""
        if self.plan != "lp":
            return (int(self.bits or 0),)
        return OPTIONS if self.granularity == "expert" else WIDTHS

    @property
    def needs_data(self) -> bool:
        return self.plan == "lp" or self.method == "gptq"

    @property
    def propagate(self) -> bool:
        return self.method == "gptq" and self.opts.propagate


@dataclass
class _Run:
    """What every mode shares: the job, the options, the layout, the profile's importance."""

    job: Job
    o: QuantOptions
    lay: Layout
    prof: Any
    imp: np.ndarray
    scale_bytes: int

    @property
    def ckpt(self) -> Checkpoint:
        return self.job.ckpt

    def tokens(self) -> TokenSet | None:
        return self.job.tokens() if self.o.needs_data else None

    def engine(self, label: str, tokens: TokenSet | None) -> Engine:
        """The layer-streamed pass over ``tokens`` (None: no windows, a write-only pass)."""
        ids = tokens.input_ids if tokens is not None else torch.zeros(0, 1, dtype=torch.long)
        return Engine(self.ckpt, ids, self.o.batch_size, self.job.device, label)

    def plan(self, meas: dict[str, Any], tokens: TokenSet | None, widths: tuple[Width, ...] | None = None) -> dict:
        """The bit plan from a measurement (``widths``: its candidate widths, default the mode's)."""
        o = self.o
        supers, super_rule = _super_experts(self.ckpt, self.lay, self.prof, meas)
        plan = make_plan(
            self.lay, meas, widths or o.widths, o.plan, o.bits, o.budget_gb, o.granularity, o.other_bits,
            self.scale_bytes, self.imp, o.min_tokens, o.cost_model, o.protect, supers,
        )  # fmt: skip
        plan.update(
            super_experts=[list(x) for x in supers], super_rule=super_rule,
            gptq=o.opts.describe() if o.method == "gptq" else None, method=o.method, importance=o.importance,
            calibration=tokens.describe() if tokens is not None else None,
            source_model=str(self.ckpt.path), source_fingerprint=self.ckpt.fingerprint,
        )  # fmt: skip
        return plan


def run_quantize(
    model: str | Path | None, output: str | Path, measurement: dict[str, Any] | None = None, **options: Any
) -> dict[str, Any]:
    """Quantize a model's routed experts (and other linears at ``other_bits``); returns the bit plan.

    ``options``: the fields of :class:`QuantOptions`. Writes OUTPUT as a compressed-tensors pack-quantized folder
    with bit_plan.json and moecompress.json, or only OUTPUT/bit_plan.json with ``plan_only``. Refusals (nothing
    written) raise UserError. ``measurement`` (from :func:`measure_model`) reuses one measuring pass for several
    plans (benchmarks)."""
    if options.get("opts") is None:
        options.pop("opts", None)
    unknown = set(options) - {f.name for f in fields(QuantOptions)}
    if unknown:
        raise TypeError(f"run_quantize got unknown options {sorted(unknown)}")
    other_given = options.get("other_bits") is not None  # None: the default (8; gpt-oss MXFP4 keeps 16)
    if not other_given:
        options.pop("other_bits", None)
    o = QuantOptions(**options)
    o.check()
    r = _prepare(model, output, o)
    if r.lay is None:  # gpt-oss: MXFP4 experts in the release layout (quant/mxfp4.py), no bit plan to choose
        check_options(o, other_given, r.ckpt.config)
        return run_mxfp4(r.job, o)
    if measurement is not None:
        return _planned(r, *_reuse(r, measurement))
    if o.plan == "uniform" and not o.plan_only:
        return _uniform(r)
    tokens = r.tokens()
    return _planned(r, _measure_pass(r, tokens), tokens)


def _prepare(model: str | Path | None, output: str | Path, o: QuantOptions) -> _Run:
    """The job (checkpoint, guarded output, windows from --calib even with a profile), layout, importance; an
    impossible --budget-gb is refused here, before any work."""
    job = Job.prepare(
        model, output, calib=o.calib, samples=o.samples, seq_len=o.seq_len, seed=o.seed, batch_size=o.batch_size,
        device=o.device, overwrite=o.overwrite, profile_dir=o.profile, profile_windows=False, op="quantize",
        settings={"method": o.method, "plan": o.plan},
    )  # fmt: skip
    if writes_mxfp4(job.ckpt.config):
        return _Run(job, o, None, None, None, 0)  # type: ignore[arg-type]
    lay = Layout(job.ckpt)
    prof = job.profile()
    imp = _importance(lay, prof, o.importance)
    sb = torch.tensor([], dtype=scale_dtype_of(job.ckpt)).element_size()
    if o.budget_gb is not None:
        fixed = lay.fixed_bytes(o.other_bits, sb)
        smallest = fixed + len(lay.moe) * lay.E * lay.expert_bytes(min(WIDTHS), sb)
        if o.budget_gb * 1e9 < smallest:
            raise UserError(
                f"--budget-gb {o.budget_gb:g} is below the smallest possible model ({smallest / 1e9:.4f} GB with "
                f"every routed expert at {min(WIDTHS)} bits and other weights at --other-bits {o.other_bits}): raise it"
            )
    return _Run(job, o, lay, prof, imp, sb)


def _reuse(r: _Run, measurement: dict[str, Any]) -> tuple[dict[str, Any], TokenSet, tuple[Width, ...]]:
    """A measurement of :func:`measure_model` (its GPTQ options win) for this run's plan."""
    o = r.o
    if measurement["method"] != o.method or measurement["fingerprint"] != r.ckpt.fingerprint:
        raise ValueError("measurement was made with another method or model")
    pairs = {split_width(w) for w in measurement["widths"]}
    if o.plan == "uniform" and (int(o.bits or 0),) * 2 not in pairs:
        raise ValueError(f"measurement has no codes at {o.bits} bits")
    if o.plan == "lp" and not {split_width(w) for w in o.widths} <= pairs:
        raise ValueError("measurement lacks widths this plan chooses from (per-expert plans need OPTIONS)")
    r.o = replace(o, opts=measurement.get("opts") or o.opts)
    return measurement["meas"], measurement["tokens"], tuple(measurement["widths"])


def _uniform(r: _Run) -> dict[str, Any]:
    """One pass: every routed expert at --bits, written layer by layer; the plan reports what the pass measured."""
    o, tokens = r.o, r.tokens()
    t = QuantTransform(
        int(o.bits or 0), o.method, min_tokens=o.min_tokens, opts=o.opts, other_bits=o.other_bits,
        propagate=o.propagate, with_err=tokens is not None,
    )  # fmt: skip
    return _write(r, t, tokens, lambda: r.plan(_collected(r.lay, t), tokens))


def _planned(
    r: _Run, meas: dict[str, Any], tokens: TokenSet | None, widths: tuple[Width, ...] | None = None
) -> dict[str, Any]:
    """The plan from a measurement; unless --plan-only, a pass that writes each expert at its planned width."""
    widths = widths or r.o.widths  # a reused measurement's widths: layer plans choose only one-width options
    plan = r.plan(meas, tokens, widths)
    o = r.o
    if o.plan_only:
        with atomic_dir(r.job.out, overwrite=o.overwrite) as tmp:
            (tmp / "bit_plan.json").write_text(json.dumps(plan, indent=1) + "\n")
        return plan
    by_pair = {split_width(w): w for w in widths}  # the measured width of each (gate/up, down) choice
    planned = {
        int(l): [by_pair[(x["gate_up_bits"], x["down_bits"])] for x in d["experts"]] for l, d in plan["layers"].items()
    }
    codes = None if o.propagate else meas.get("codes")
    t = QuantTransform(
        planned, o.method, min_tokens=o.min_tokens, opts=o.opts, other_bits=o.other_bits, propagate=o.propagate,
        codes=codes,
    )  # fmt: skip
    # with the measured codes (or RTN) the write pass needs no windows: the layers stream through, no compute
    return _write(r, t, tokens if o.method == "gptq" and codes is None else None, lambda: plan)


def _write(r: _Run, t: QuantTransform, tokens: TokenSet | None, get_plan: Any) -> dict[str, Any]:
    """The quantize pass into the output folder; ``get_plan()`` is the bit plan once the pass has run."""
    job, o = r.job, r.o
    assert job.out is not None
    with Output(job.out, o.overwrite) as out:
        out.add_globals(r.ckpt, [t])
        r.engine("quantize", tokens).run([t], emit=out.add_layer)
        plan = get_plan()
        config = r.ckpt.config.to_dict()
        t.config(config)
        manifest = _manifest(r, t, plan, tokens)
        out.finish(
            r.ckpt, config, manifest, extra_json={"bit_plan.json": plan},
            report_inputs=[Path(o.profile)] if o.profile is not None else [], elapsed=job.elapsed,
        )  # fmt: skip
    return plan


def _manifest(r: _Run, t: QuantTransform, plan: dict[str, Any], tokens: TokenSet | None) -> Manifest:
    """moecompress.json: the common fields and one "quantize" stage."""
    o, ckpt = r.o, r.ckpt
    warnings = []
    if plan["few_token_experts"]:
        warnings.append(
            f"{len(plan['few_token_experts'])} experts had fewer than {o.min_tokens} routed calibration tokens: "
            "RTN instead of GPTQ (see bit_plan.json few_token_experts)"
        )
    if not t.uniform:
        warnings.append("mixed widths: load exactly with moecompress.load (transformers/vLLM need one width)")
    m = Manifest(
        "quantize", "quantized", "transformers" if t.uniform else "moecompress.load", str(ckpt.path),
        ckpt.fingerprint, tokens.describe() if tokens is not None else None, ckpt.num_params, ckpt.bytes_on_disk,
        warnings=warnings,
    )  # fmt: skip
    section = t.section()
    section.pop("warnings")  # the same few-token warning, worded for this command, is above
    m.add(
        "quantize",
        {
            **section,
            "command_line": o.command or "moecompress quantize",
            "servable": t.uniform or plan["granularity"] == "layer",
            "plan": o.plan,
            "bits": o.bits,
            "budget_gb": o.budget_gb,
            "bytes_predicted": plan["total_bytes"],
            "protected": plan["super_experts"],
            "calibration_fingerprint": tokens.fingerprint if tokens is not None else None,
            "passes": "measure + quantize" if o.plan == "lp" else "quantize",
        },
    )
    return m


def _collected(lay: Layout, t: QuantTransform) -> dict[str, Any]:
    """What a uniform quantize pass measured, in the shape ``make_plan`` reads."""
    d = [t.layers[l] for l in lay.moe]
    data = d[0]["counts"] is not None
    return {
        "err": np.stack([x["err"] for x in d]) if data and d[0]["err"] is not None else None,
        "counts": np.stack([x["counts"] for x in d]) if data else None,
        "max_abs": np.stack([x["max_abs"] for x in d]) if data else None,
        "used": {l: x["used"] for l, x in zip(lay.moe, d, strict=True)},
        "probe_kl": None,
    }


def _measure_pass(r: _Run, tokens: TokenSet | None) -> dict[str, Any]:
    """The measuring pass of a plan (no pass without calibration data: uniform RTN needs no measurement)."""
    o = r.o
    if tokens is None:
        used = {l: ["rtn"] * r.lay.E for l in r.lay.moe}
        return {"err": None, "counts": None, "max_abs": None, "probe_kl": None, "used": used}
    probes = PROBE_WIDTHS if (o.plan == "lp" and o.cost_model == "kl") else ()
    lay = r.lay
    weights = lay.E * 3 * lay.I * lay.H  # one MoE layer's routed weights
    layer_bytes = weights * DTYPES.get(keys.expert_info(r.ckpt, lay.moe[0], 0)[1], torch.float32).itemsize
    bound = o.max_cache_bytes if o.max_cache_bytes is not None else code_memory_bound(layer_bytes)
    one = PackedCodes.estimate(weights, o.widths)  # one layer's codes at every width (17 bits/weight for WIDTHS)
    total = one * len(lay.moe)
    # propagated writes see other inputs, so other codes: none kept; max_cache_bytes=0 keeps none either
    keep = not o.propagate and not o.plan_only and bound > 0
    held = total if keep else one  # what the measuring pass holds in memory
    # past the bound, the codes go to files as they are made, where the disk has room for them twice
    spill = held > bound and 2 * held <= _free_tmp()
    keep = keep and (spill or total <= bound)  # else (no disk room) the write pass quantizes again
    return measure(
        r.ckpt, tokens, o.widths, o.method, o.min_tokens, o.batch_size, r.job.device, o.opts, probes, keep,
        spill_codes=spill,
    )  # fmt: skip


def _free_tmp() -> int:
    """Free bytes of the temporary folder's disk (0 when unknown)."""
    import shutil
    import tempfile

    try:
        return shutil.disk_usage(tempfile.gettempdir()).free
    except OSError:
        return 0


def measure(
    ckpt: Checkpoint,
    tokens: TokenSet,
    widths: tuple[int, ...],
    method: str,
    min_tokens: int,
    batch_size: int,
    device: torch.device | None,
    opts: GPTQOptions | None = None,
    probe_widths: tuple[int, ...] = PROBE_WIDTHS,
    keep_codes: bool = False,
    spill_codes: bool = False,
) -> dict[str, Any]:
    """One measuring pass (``MeasureTransform``): errors [L, E, B], token counts [L, E], max |expert output|
    [L, E], methods used per layer, the probe KLs {(layer, bits): KL} (None without probes) and, with
    ``keep_codes``, the codes {(layer, bits): PackedCodes} (a ``CodeCache``, in files with ``spill_codes``; else
    None)."""
    t = MeasureTransform(
        widths, method, min_tokens=min_tokens, opts=opts, probe_widths=probe_widths, keep_codes=keep_codes,
        spill_codes=spill_codes,
    )  # fmt: skip
    engine = Engine(ckpt, tokens.input_ids, batch_size, device, "quantize: measure")
    engine.run([t], emit=t.probe_layer)
    moe = list(ckpt.moe_layers)
    return {
        "err": np.stack([t.err[l] for l in moe]),
        "counts": np.stack([t.counts[l] for l in moe]),
        "max_abs": np.stack([t.max_abs[l] for l in moe]),
        "used": {l: t.used[l] for l in moe},
        "probe_kl": t.probe_kl(engine),
        "codes": t.codes,
    }


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
    keep_codes: bool = True,
) -> dict[str, Any]:
    """One measuring pass at every candidate width (``widths``; LP plans need all of WIDTHS), reusable by
    ``run_quantize(measurement=...)`` (whose write pass reuses the kept codes unless its options propagate)."""
    job = Job.prepare(model, None, calib=calib, samples=samples, seq_len=seq_len, seed=seed, batch_size=batch_size)
    tokens = job.tokens()
    t0 = time.time()
    meas = measure(job.ckpt, tokens, widths, method, min_tokens, batch_size, device, opts, probe_widths, keep_codes)
    return {
        "meas": meas, "tokens": tokens, "method": method, "opts": opts, "widths": widths,
        "fingerprint": job.ckpt.fingerprint, "elapsed_s": time.time() - t0,
    }  # fmt: skip
