"""Quantized expert layouts of a fused-on-disk model type, written and loaded in stock transformers (test helper,
also used by bench/quant_load_check.py --fused).

``layouts(path)`` gives, for a tiny checkpoint whose routed experts are fused on disk (gpt-oss, Granite, Qwen3-VL-MoE,
Gemma-4, HY-V4, Aria, Muse Spark), the compressed-tensors layouts a writer could produce: per-expert keys
(``<block>.experts.<e>.<proj>.weight_packed``, what moecompress writes for the other families) and the fused tensors
packed under their disk names, their transformers parameter names, or with the parameter-suffix companions.
``try_layout`` writes one with its quantization_config and reports what ``from_pretrained`` made of it; ``trace``
says which transform of transformers' loader renames one key to what.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from moecompress.core.checkpoint import Checkpoint
from moecompress.quant.ctformat import quantization_config
from moecompress.quant.pack import pack_int32
from moecompress.quant.rtn import rtn_quantize

GROUP = 8


def pack(w: torch.Tensor, base: str) -> dict[str, torch.Tensor]:
    """pack-quantized tensors of ``w [..., R, C]`` (RTN 4 bit, groups of 8 along the last dim)."""
    q, sc = rtn_quantize(w.reshape(-1, w.shape[-1]).float(), 4, GROUP, torch.float32)
    lead = w.shape[:-1]
    return {
        base + ".weight_packed": pack_int32(q, 4).reshape(*lead, -1),
        base + ".weight_scale": sc.reshape(*lead, -1),
        base + ".weight_shape": torch.tensor(list(w.shape[-2:]), dtype=torch.int64),
    }


def _param_names(ck: Checkpoint, shapes: dict[str, tuple[int, ...]]) -> dict[str, str]:
    """disk key -> the transformers parameter it loads into, for every fused routed-experts tensor of ``ck``: the
    checkpoint's 3-D tensors (``shapes``: disk name -> shape) that the family's routed pattern owns, renamed by
    transformers' own conversion mapping (Granite's ``input_linear.weight`` -> ``experts.gate_up_proj``)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    fam = ck.family
    disk = [k for l in ck.moe_layers for k in shapes if fam.routed_key_pattern(l).match(ck.view_key(k))]
    disk = [k for k in disk if len(shapes[k]) == 3]
    model = meta_model(ck.path)
    conv = get_model_conversion_mapping(model)
    ren = [c for c in conv if not isinstance(c, WeightConverter)]
    cvt = [c for c in conv if isinstance(c, WeightConverter)]
    sd = model.state_dict()
    return {k: rename_source_key(k, ren, cvt, model.base_model_prefix, sd)[0] for k in sorted(disk)}


def meta_model(path: Path, config: Any = None) -> torch.nn.Module:
    """The checkpoint's transformers model (the Auto class a user loads it with) on the meta device."""
    from transformers import AutoConfig

    cfg = config or AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        return auto_class(cfg).from_config(cfg)


def auto_class(cfg: Any) -> Any:
    """AutoModelForCausalLM, or the multimodal wrapper's own Auto class (Qwen3-VL-MoE, Aria, Muse Spark)."""
    from transformers import AutoModelForCausalLM

    from moecompress.core.derive import wrapper_auto_class

    return wrapper_auto_class(cfg) or AutoModelForCausalLM


def layouts(path: Path) -> dict[str, tuple[dict[str, torch.Tensor], list[str]]]:
    """name -> (every tensor of the checkpoint, routed experts quantized in that layout; compressed-tensors targets).

    - per-expert: ``<block>.experts.<e>.<gate|up|down>_proj.weight_packed`` (what moecompress writes for families
      with per-expert keys), under the checkpoint's names;
    - fused (disk names): each fused tensor packed as ``<disk name minus .weight>.weight_packed``;
    - fused (parameter names): as ``<transformers parameter>.weight_packed`` (differs from the disk names where the
      conversion mapping renames them: Granite, Aria);
    - fused (parameter suffixes): as ``<parameter>_packed`` / ``_scale`` / ``_shape``, the companion-parameter naming
      of ``HfQuantizer.update_weight_conversions`` (``gate_up_proj`` + ``_scale_inv``).
    Layouts whose keys equal an earlier layout's are left out."""
    from safetensors import safe_open

    ck = Checkpoint(path)
    fam = ck.family
    disk: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            disk.update({k: fh.get_tensor(k) for k in fh.keys()})  # noqa: SIM118
    params = _param_names(ck, {k: tuple(v.shape) for k, v in disk.items()})
    rest = {k: v for k, v in disk.items() if k not in params}
    per_expert = dict(rest)
    for l in ck.moe_layers:
        w = ck.moe_weights(l)
        pre = f"{fam.block_prefix(l)}{fam.experts}"
        for e in range(w.gate.shape[0]):
            for name, m in (("gate_proj", w.gate[e]), ("up_proj", w.up[e]), ("down_proj", w.down[e])):
                per_expert.update(pack(m.contiguous(), ck.disk_key(f"{pre}.{e}.{name}")))
    out = {"per-expert": (per_expert, [r"re:.*\.experts\.\d+\.(?:gate_proj|up_proj|down_proj)$"])}
    for name, base in (
        ("fused (disk names)", {k: k.removesuffix(".weight") for k in params}),
        ("fused (parameter names)", dict(params)),
    ):
        tensors = dict(rest)
        for k, b in base.items():
            tensors.update(pack(disk[k], b))
        if all(set(tensors) != set(t) for t, _ in out.values()):
            out[name] = (tensors, [f"re:^{re.escape(b)}$" for b in sorted(base.values())])
    suffixed = dict(rest)
    for k, p in params.items():
        suffixed.update({p + s.removeprefix(".weight"): v for s, v in pack(disk[k], "").items()})
    out["fused (parameter suffixes)"] = (suffixed, [f"re:^{re.escape(p)}$" for p in sorted(params.values())])
    return out


def trace(out: Path, key: str, dequant: bool) -> str:
    """What transformers' loader makes of one checkpoint key of a written layout: the renamings and the converter
    (with its operations, the quantizer's dequantize step included) that ``core_model_loading.rename_source_key``
    applies, the name it ends at and whether the model has that parameter."""
    from transformers import AutoConfig
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key
    from transformers.quantizers import AutoHfQuantizer

    cfg = AutoConfig.from_pretrained(out)
    qc = dict(cfg.quantization_config)
    qc["dequantize"] = dequant
    model = meta_model(out, cfg)
    quantizer = AutoHfQuantizer.from_config(qc, pre_quantized=True)
    quantizer.validate_environment()  # (sets the kernel choice get_weight_conversions reads)
    conv = get_model_conversion_mapping(model, None, quantizer)
    ren = [c for c in conv if not isinstance(c, WeightConverter)]
    cvt = [c for c in conv if isinstance(c, WeightConverter)]
    steps, k = [], key
    for r in ren:
        k2, _ = r.rename_source_key(k)
        if k2 != k:
            steps.append(f"{type(r).__name__}({r._original_source_patterns[0]!r})")
            k = k2
    final, pattern = rename_source_key(key, ren, cvt, model.base_model_prefix, model.state_dict())
    if pattern is not None:
        c = next(c for c in cvt if pattern in c.source_patterns)
        ops = ",".join(type(o).__name__ for o in c.operations)
        steps.append(f"WeightConverter({c._original_source_patterns[0]!r}, ops [{ops}])")
    where = "a model parameter" if final in model.state_dict() else "no model parameter"
    return f"{key} -> {' -> '.join(steps) or 'no transform'} -> {final} ({where})"


def try_layout(src: Path, out: Path, tensors: dict[str, torch.Tensor], targets: list[str], dequant: bool) -> dict:
    """Write ``src`` with ``tensors`` and a compressed-tensors config, then ``from_pretrained`` it as a user would
    (the model type's Auto class): {"loads", "missing", "unexpected", examples} or {"loads": False, "error"}."""
    from transformers import AutoConfig

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for f in src.iterdir():
        if not f.name.endswith(".safetensors") and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(f, out / f.name)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = quantization_config({}, ["lm_head"], "experts", {(4, GROUP): targets})
    if dequant:
        cfg["quantization_config"]["dequantize"] = True
    (out / "config.json").write_text(json.dumps(cfg))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, info = auto_class(AutoConfig.from_pretrained(out)).from_pretrained(out, output_loading_info=True)
    except Exception as e:  # the failure itself is the finding
        return {"loads": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    missing, unexpected = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
    res: dict[str, Any] = {
        "loads": not missing and not unexpected and not info["mismatched_keys"],
        "missing": len(missing),
        "unexpected": len(unexpected),
        "missing_example": missing[:2],
        "unexpected_example": unexpected[:2],
    }
    return res


def mxfp4_check(ck: Checkpoint, work: Path, cli: Any) -> None:
    """gpt-oss's quantized output (MXFP4, quant/mxfp4.py) for bench/families' quantize column: the model type rebuilt
    at expert width 64 (MXFP4 blocks are 32 wide; the tiny width 40 is refused in one line), ``quantize --bits 4
    --method rtn``, then plain ``from_pretrained`` with no missing/unexpected/mismatched keys and the logits of
    ``moecompress.load`` (``cli(*argv)``: the checks' CLI runner)."""
    import sys

    from transformers import AutoModelForCausalLM

    from moecompress import load

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "families"))
    from family_models import build

    src = build(ck.config.model_type, work / "w64", width=64)
    for f in ck.path.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(f, src / f.name)
    out = work / "q4-mxfp4"
    cli("quantize", src, "--bits", "4", "--method", "rtn", "--samples", "2", "--seq-len", "16", "--device", "cpu",
        "-o", out)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (on a CPU transformers says it dequantizes MXFP4 to bf16)
        model, info = AutoModelForCausalLM.from_pretrained(
            out, output_loading_info=True, experts_implementation="eager"
        )
    bad = {k: info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info[k]}
    assert not bad, bad
    ids = torch.arange(16)[None] % 300
    with torch.no_grad():
        a, b = model(input_ids=ids).logits.float(), load(out)(input_ids=ids).logits.float()
    assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())
