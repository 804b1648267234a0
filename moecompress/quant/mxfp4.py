"""MXFP4 output for gpt-oss (issue 12): the routed experts in the layout of the published gpt-oss checkpoints, which
stock transformers loads (its Mxfp4 quantizer; on a CPU without kernels it dequantizes to bf16 on load).

Format (OCP microscaling, as gpt-oss ships it, read by ``transformers.integrations.mxfp4``): along each weight row's
input dimension, blocks of 32 FP4 (e2m1) values share one power-of-two scale. Per projection ``P`` of layer ``l``:

- ``...experts.P_blocks`` uint8 ``[E, R, C / 32, 16]``: two FP4 codes per byte, the low nibble first (column 2j in
  bits 0-3, 2j + 1 in bits 4-7); a code is ``sign << 3 | m``, ``m`` indexing ``FP4_VALUES``;
- ``...experts.P_scales`` uint8 ``[E, R, C / 32]``: E8M0, the block's scale is ``2 ** (byte - 127)``;

with ``R`` the output rows: ``gate_up_proj`` [E, 2I, H / 32, 16] (gate and up rows interleaved, g0, u0, g1, ...),
``down_proj`` [E, H, I / 32, 16]. H and I must be multiples of 32. The expert biases, routers and every other weight
are written as the source holds them; config.json gets ``quantization_config {"quant_method": "mxfp4",
"modules_to_not_convert": [...]}`` (the release's list).

Quantization: round-to-nearest (``rtn_encode``; a block's exponent is the smallest with max |w| / 2^e <= 6, or one
below it when clipping the largest values lowers the block's squared error, so a release re-encoded is byte-identical
whenever its blocks use their largest codes) or GPTQ (``gptq_quantize`` with ``FP4_GRID``: the same exponent choice,
weighted by the Hessian diagonal, then column-by-column FP4 rounding with error feedback), per expert with its routed
tokens' Hessians (router-weighted), gate/up first and down_proj's Hessian from the quantized gate/up outputs through
the experts' own biased, clamped SwiGLU (``ExpertsKernel``).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ..core.checkpoint import DTYPE_BYTES
from ..core.engine import Engine, LayerContext, Transform
from ..core.errors import UserError
from ..core.manifest import Manifest
from ..core.output import Output
from .gptq import gptq_quantize, prepare_hessian
from .layer import GPTQOptions, hessian_chunk

BLOCK = 32  # values per scale
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # e2m1 magnitudes by code (bit 3 is the sign)
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)  # ties go to the smaller magnitude
RELEASE_NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


def writes_mxfp4(config: Any) -> bool:
    """The model type whose quantized experts are written as MXFP4 (transformers loads MXFP4 for gpt-oss only)."""
    return getattr(config, "model_type", None) == "gpt_oss"


def _pow2(e: torch.Tensor) -> torch.Tensor:
    """float32 2^e of integer exponents (exact)."""
    return torch.ldexp(torch.ones(e.shape, device=e.device), e.to(torch.int32))


def fp4_codes(x: torch.Tensor) -> torch.Tensor:
    """Nearest FP4 code (uint8 0..15, sign in bit 3, -0 keeps its sign) of ``x`` (clamped to +-6)."""
    mid = torch.tensor(_MIDPOINTS, dtype=torch.float32, device=x.device)
    mag = torch.bucketize(x.abs().float().contiguous(), mid)  # [..] 0..7
    return (mag | (torch.signbit(x).to(mag.dtype) << 3)).to(torch.uint8)


def fp4_values(codes: torch.Tensor) -> torch.Tensor:
    """float32 values of FP4 codes (uint8 0..15)."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=codes.device)
    v = lut[(codes & 7).long()]
    return torch.where((codes & 8) > 0, -v, v)


def choose_exponents(w: torch.Tensor, col_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Block exponents (int32 ``[..., R, C / 32]``) of ``w [..., R, C]``: e0, the smallest e with max |w| <= 6 * 2^e,
    or e0 - 1 when clipping to 6 * 2^(e0 - 1) has a strictly lower squared error (each column's weighted by
    ``col_weight [C]``). All-zero blocks get 0; exponents are kept within E8M0's -127..127."""
    cols = w.shape[-1]
    if cols % BLOCK:
        raise ValueError(f"MXFP4 needs the input width to be a multiple of {BLOCK}, got {cols}")
    wg = w.float().unflatten(-1, (cols // BLOCK, BLOCK))  # [..., R, G, 32]
    m, k = torch.frexp(wg.abs().amax(-1) / 6.0)  # x = m 2^k, m in [0.5, 1)
    e0 = torch.where(m == 0.5, k - 1, k)  # ceil(log2(x)), exact
    e0 = torch.where(m == 0, torch.zeros_like(e0), e0).clamp(-126, 127)
    cw = None if col_weight is None else col_weight.float().reshape(cols // BLOCK, BLOCK)

    def err(e: torch.Tensor) -> torch.Tensor:
        s = _pow2(e).unsqueeze(-1)  # [..., R, G, 1]
        d = (fp4_values(fp4_codes(wg / s)) * s - wg).pow(2)
        return (d if cw is None else d * cw).sum(-1)

    return torch.where(err(e0 - 1) < err(e0), e0 - 1, e0).to(torch.int32)


def pack(codes: torch.Tensor, exps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(blocks uint8 [..., R, C / 32, 16], scales uint8 [..., R, C / 32])`` of FP4 codes ``[..., R, C]`` and their
    block exponents ``[..., R, C / 32]`` (low nibble first)."""
    c = codes.to(torch.uint8)
    byte = c[..., 0::2] | (c[..., 1::2] << 4)  # [..., R, C / 2]
    return byte.unflatten(-1, (-1, BLOCK // 2)).contiguous(), (exps + 127).to(torch.uint8)


def unpack(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 ``[..., R, C]`` of MXFP4 ``blocks [..., R, G, 16]`` and ``scales [..., R, G]`` (the inverse of pack)."""
    b = blocks.to(torch.uint8)
    codes = torch.stack([b & 15, b >> 4], dim=-1).flatten(-2)  # [..., R, G, 32]
    v = fp4_values(codes) * _pow2(scales.to(torch.int32) - 127).unsqueeze(-1)
    return v.flatten(-2)


def rtn_encode(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest MXFP4 of ``w [..., R, C]``: ``(blocks, scales)`` as :func:`pack`."""
    exps = choose_exponents(w)
    s = _pow2(exps).repeat_interleave(BLOCK, dim=-1)  # [..., R, C]
    return pack(fp4_codes(w.float() / s), exps)


class FP4Grid:
    """The FP4 grid for ``gptq_quantize(grid=...)``: integer codes are twice the FP4 value (0, +-1, 2, 3, 4, 6, 8,
    12), so a block's scale is half its power of two; ``to_mxfp4`` turns GPTQ's (codes, scales) into blocks."""

    def scales(self, w: torch.Tensor, g: int, col_weight: torch.Tensor | None = None) -> torch.Tensor:
        if g != BLOCK:
            raise ValueError(f"MXFP4 blocks are {BLOCK} columns, got group size {g}")
        return 0.5 * _pow2(choose_exponents(w, col_weight))  # [R, G]

    def round(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * fp4_values(fp4_codes(x / 2.0))

    @staticmethod
    def to_mxfp4(q: torch.Tensor, s: torch.Tensor, w: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """GPTQ's int8 codes ``q [R, C]`` and half-scales ``s [R, G]`` as ``(blocks, scales)``; a zero code takes the
        sign of the weight ``w [R, C]`` it came from (so weights already on the grid, -0 included, keep their bytes)."""
        exps = torch.frexp(s.float())[1]  # s = 2^(e - 1) = 0.5 * 2^e: frexp gives (0.5, e)
        codes = fp4_codes(q.float() / 2.0)
        if w is not None:
            codes |= ((q == 0) & torch.signbit(w)).to(torch.uint8) << 3
        return pack(codes, exps)


FP4_GRID = FP4Grid()


@torch.no_grad()
def quantize_experts(
    gate_up: torch.Tensor,  # [E, 2I, H] (gate rows first, the internal view)
    down: torch.Tensor,  # [E, H, I]
    kernel: Any,  # ExpertsKernel of the block's BiasedExperts: hidden(x, gate_up[e], e), output(h, down[e], e)
    method: str,
    cap: Any,  # LayerCapture (None for RTN)
    min_tokens: int,
    opts: GPTQOptions,
) -> tuple[dict[str, torch.Tensor], list[str], torch.Tensor | None]:
    """One layer's routed experts in MXFP4: ``({"gate_up": (blocks, scales) [E, 2I, ...], "down": ...}, used,
    err [E])`` with ``err[e] = sum p^2 ||f_q - f||^2 / T`` over e's routed tokens (None without a capture) and
    ``used[e]`` 'gptq', 'rtn' or 'rtn (n tokens)' (fewer than ``min_tokens``). Runs on the capture's device."""
    E, I2, H = gate_up.shape
    I = down.shape[-1]
    dev = cap.device if cap is not None else torch.device("cpu")
    gub = torch.empty(E, I2, H // BLOCK, BLOCK // 2, dtype=torch.uint8)
    gus = torch.empty(E, I2, H // BLOCK, dtype=torch.uint8)
    dnb = torch.empty(E, H, I // BLOCK, BLOCK // 2, dtype=torch.uint8)
    dns = torch.empty(E, H, I // BLOCK, dtype=torch.uint8)
    err = torch.zeros(E, dtype=torch.float64) if cap is not None else None
    counts = cap.counts.tolist() if cap is not None else [0] * E
    gptq = [method == "gptq" and counts[e] >= min_tokens for e in range(E)]
    used = ["gptq" if g else ("rtn" if method == "rtn" else f"rtn ({counts[e]} tokens)") for e, g in enumerate(gptq)]

    def quantize(w: torch.Tensor, h: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if h is None:
            return rtn_encode(w)
        ph = prepare_hessian(h, opts.damp, opts.actorder)
        q, s = gptq_quantize(
            w, None, 4, BLOCK, torch.float32, opts.damp, actorder=opts.actorder, clip=opts.clip, prepared=ph,
            grid=FP4_GRID,
        )  # fmt: skip
        return FP4Grid.to_mxfp4(q, s, w)

    chunk = hessian_chunk(E, H, I, False, dev) if cap is not None else E
    for c0 in range(0, E, chunk):
        ids = list(range(c0, min(E, c0 + chunk)))
        hs = [e for e in ids if gptq[e]]
        h_gu = cap.hessians(hs)[0] if hs else None  # [n, H, H]
        for e in ids:
            gu, dn = gate_up[e].to(dev).float(), down[e].to(dev).float()
            b1, s1 = quantize(gu, h_gu[hs.index(e)] if gptq[e] else None)
            gu_q = unpack(b1, s1)  # [2I, H]
            xe = pe = hq = None
            if cap is not None:
                xe, pe = cap.routed(e)
                hq = kernel.hidden(xe, gu_q, e)  # [n, I] through the quantized gate/up
            hdn = None
            if gptq[e]:
                hw = hq * pe.unsqueeze(-1) if opts.weighted else hq
                hdn = hw.T @ hw
            b2, s2 = quantize(dn, hdn)
            if err is not None and xe.shape[0]:
                ref = kernel.output(kernel.hidden(xe, gu, e), dn, e)
                d = (kernel.output(hq, unpack(b2, s2), e) - ref) * pe.unsqueeze(-1)
                err[e] = d.double().pow(2).sum().item()
            gub[e], gus[e], dnb[e], dns[e] = b1.cpu(), s1.cpu(), b2.cpu(), s2.cpu()
        del h_gu
    if err is not None:
        err /= max(cap.tokens, 1)
    return {"gate_up": (gub, gus), "down": (dnb, dns)}, used, err


def interleave(a: torch.Tensor) -> torch.Tensor:
    """Rows [E, 2I, ...] gate first -> gate/up interleaved (g0, u0, g1, u1, ...), gpt-oss's disk order."""
    I = a.shape[1] // 2
    return torch.stack([a[:, :I], a[:, I:]], dim=2).flatten(1, 2)


class Mxfp4Transform(Transform):
    """Quantize each MoE layer's routed experts to MXFP4 and hand the engine the release-layout tensors."""

    name = "quantize"
    reads_narrow = True  # expert weights are upcast per expert
    layout = "quantized"

    def __init__(self, method: str = "gptq", min_tokens: int = 32, opts: GPTQOptions | None = None):
        if method not in ("gptq", "rtn"):
            raise ValueError(f"method {method!r} is not one of gptq, rtn")
        self.method, self.min_tokens, self.opts = method, min_tokens, opts or GPTQOptions()
        self.layers: dict[int, dict[str, Any]] = {}

    def moe_layer(self, ctx: LayerContext) -> None:
        from .transform import capture_layer, router_tensors

        ex, fam, l = ctx.experts, ctx.engine.fam, ctx.index
        gu, dn = ex.gate_up_proj.detach(), ex.down_proj.detach()  # [E, 2I, H], [E, H, I]
        cap = capture_layer(ctx, False, self.opts.weighted) if self.method == "gptq" else None
        codes, used, err = quantize_experts(gu, dn, ex.act_fn, self.method, cap, self.min_tokens, self.opts)
        (gub, gus), (dnb, dns) = codes["gate_up"], codes["down"]
        info = ctx.engine.ckpt.tensor_info()

        def bias(name: str, t: torch.Tensor) -> torch.Tensor:
            from .transform import DTYPES

            key = fam.fused_key(l, name)
            return t.detach().to("cpu", DTYPES.get(info.get(key, {}).get("dtype", ""), torch.bfloat16)).contiguous()

        out = {
            fam.fused_key(l, "gate_up_proj") + "_blocks": interleave(gub),
            fam.fused_key(l, "gate_up_proj") + "_scales": interleave(gus),
            fam.fused_key(l, "down_proj") + "_blocks": dnb,
            fam.fused_key(l, "down_proj") + "_scales": dns,
            fam.fused_key(l, "gate_up_proj_bias"): bias("gate_up_proj_bias", interleave(ex.gate_up_bias)),
            fam.fused_key(l, "down_proj_bias"): bias("down_proj_bias", ex.down_bias),
        }
        rest = {**{k: v for k, v in out.items() if not k.endswith(("_blocks", "_scales"))}, **router_tensors(ctx)}
        ctx.replace({**out, **rest})
        self.layers[l] = {
            "rest_bytes": sum(t.numel() * t.element_size() for t in rest.values()),  # biases, router
            "used": used, "err": None if err is None else err.tolist(),
            "counts": None if cap is None else cap.counts.tolist(),
            "bytes": [sum(int(t[e].numel()) for t in (gub, gus, dnb, dns)) for e in range(gu.shape[0])],
        }  # fmt: skip

    def config(self, cfg: dict[str, Any]) -> None:
        cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": RELEASE_NOT_CONVERTED}

    def section(self) -> dict[str, Any]:
        return {
            "format": "mxfp4 (gpt-oss release layout: *_blocks / *_scales, E8M0 per 32 values)",
            "method": self.method,
            "bits": 4,
            "other_bits": 16,
            "gptq": {**self.opts.describe(), "refine_scales": False, "grid": "fp4 e2m1, power-of-two block scales"}
            if self.method == "gptq"
            else None,
            "layers": {str(l): {"bits": [4]} for l in self.layers},
        }


def check_options(o: Any, other_bits_given: bool, cfg: Any) -> None:
    """Refuse in one line what MXFP4 output cannot hold (``o``: quant/run.py's QuantOptions)."""
    what = "gpt-oss quantized experts are written as MXFP4 (the release format transformers loads)"
    if o.budget_gb is not None or o.bits != 4:
        raise UserError(f"{what}: 4 bits only, give --bits 4 (not {'--budget-gb' if o.bits is None else o.bits})")
    if o.granularity != "layer":
        raise UserError(f"{what}: one format for every expert, per-expert LP plans (--granularity expert) do not fit")
    if other_bits_given and o.other_bits != 16:
        raise UserError(f"{what}: the other weights stay as the source holds them, --other-bits must be 16")
    if o.plan_only:
        raise UserError(f"{what}: one format, no bit plan to choose: drop --plan-only")
    if o.importance != "uniform" or o.profile is not None:
        raise UserError(f"{what}: one format, no expert to weigh or protect: drop --importance / --profile")
    for key in ("hidden_size", "intermediate_size"):
        n = int(getattr(cfg, key))
        if n % BLOCK:
            raise UserError(f"{what}: config.json {key} is {n}, not a multiple of {BLOCK} (MXFP4 block size)")


def run_mxfp4(job: Any, o: Any) -> dict[str, Any]:
    """``moecompress quantize --bits 4`` of a gpt-oss model (quant/run.py hands over after ``Job.prepare``):
    one pass, every routed expert MXFP4; returns the bit plan (bit_plan.json, the CLI's table)."""
    ckpt = job.ckpt
    tokens = job.tokens() if o.method == "gptq" else None
    t = Mxfp4Transform(o.method, o.min_tokens, o.opts)
    ids = tokens.input_ids if tokens is not None else torch.zeros(0, 1, dtype=torch.long)
    t0 = time.time()
    assert job.out is not None
    with Output(job.out, o.overwrite) as out:
        out.add_globals(ckpt, [t])
        Engine(ckpt, ids, o.batch_size, job.device, "quantize (mxfp4)").run([t], emit=out.add_layer)
        plan = _plan(ckpt, t, o)
        config = ckpt.config.to_dict()
        t.config(config)
        m = Manifest(
            "quantize", "quantized", "transformers", str(ckpt.path), ckpt.fingerprint,
            tokens.describe() if tokens is not None else None, ckpt.num_params, ckpt.bytes_on_disk,
            warnings=[f"{len(plan['few_token_experts'])} experts had fewer than {o.min_tokens} routed calibration "
                      "tokens: RTN instead of GPTQ"] if plan["few_token_experts"] else [],
        )  # fmt: skip
        m.add("quantize", {
            **t.section(), "command_line": o.command or "moecompress quantize", "servable": True, "plan": "uniform",
            "bits": 4, "passes": "quantize", "elapsed_pass_s": time.time() - t0,
            "calibration_fingerprint": tokens.fingerprint if tokens is not None else None,
        })  # fmt: skip
        out.finish(
            ckpt, config, m, extra_json={"bit_plan.json": plan},
            report_inputs=[], elapsed=job.elapsed,
        )  # fmt: skip
    return plan


def _plan(ckpt: Any, t: Mxfp4Transform, o: Any) -> dict[str, Any]:
    """bit_plan.json of an MXFP4 run: every expert at 4.25 bits per weight (4-bit codes + one 8-bit scale per 32)."""
    info, fam = ckpt.tensor_info(), ckpt.family
    kept = 0
    for k, v in info.items():
        parts = k.split(".")
        if (
            k.startswith("model.layers.")
            and int(parts[2]) in t.layers
            and fam.routed_key_pattern(int(parts[2])).match(k)
        ):
            continue
        n = 1
        for s in v["shape"]:
            n *= s
        kept += n * DTYPE_BYTES.get(v["dtype"], 4)
    routed = sum(sum(d["bytes"]) for d in t.layers.values())
    kept += sum(d["rest_bytes"] for d in t.layers.values())
    layers = {}
    for l, d in t.layers.items():
        rows = [
            {
                "expert": e,
                "bits": 4.25,
                "gate_up_bits": 4,
                "down_bits": 4,
                "bytes": b,
                "predicted_cost": None,
                "err": None if d["err"] is None else {"mxfp4": d["err"][e]},
                "tokens": None if d["counts"] is None else d["counts"][e],
                "method": d["used"][e],
                "importance": 1.0,
                "protected": None,
            }  # fmt: skip
            for e, b in enumerate(d["bytes"])
        ]
        layers[str(l)] = {"bits": [4.25], "experts": rows}
    few = [
        [l, e, d["counts"][e]] for l, d in t.layers.items() for e, u in enumerate(d["used"]) if u.startswith("rtn (")
    ]
    return {
        "format": "mxfp4", "plan": "uniform", "granularity": "layer", "bits": 4, "method": o.method,
        "average_bits_routed": 4.25, "total_bytes": routed + kept, "routed_bytes": routed, "predicted_cost": None,
        "few_token_experts": few, "super_experts": [], "note": "MXFP4 has one width: no allocation, nothing protected",
        "gptq": t.section()["gptq"], "source_model": str(ckpt.path), "source_fingerprint": ckpt.fingerprint,
        "layers": layers,
    }  # fmt: skip


def load_mxfp4(path: Any, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> Any:
    """``moecompress.load`` of an MXFP4 output (or release): the transformers model built from its config without
    the quantizer, every ``*_blocks`` / ``*_scales`` pair unpacked by :func:`unpack` (not transformers' converter)
    and transposed to the module's [E, in, out]; every tensor must match a parameter (strict load)."""
    from pathlib import Path

    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    p, dtype = Path(path), dtype or torch.float32
    config = AutoConfig.from_pretrained(p, trust_remote_code=False)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, experts_implementation="eager", dtype=dtype)
    state: dict[str, torch.Tensor] = {}
    for f in sorted(p.glob("*.safetensors")):
        state.update(load_file(str(f)))
    for k in [k for k in state if k.endswith("_blocks")]:
        base = k[: -len("_blocks")]
        state[base] = unpack(state.pop(k), state.pop(base + "_scales")).transpose(1, 2)  # [E, C, R]
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    if unexpected or set(missing) - tied:
        raise UserError(
            f"{p}: MXFP4 tensors do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model.to(device).eval()
