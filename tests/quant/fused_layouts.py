"""Quantized expert layouts of a fused-on-disk model type, written and loaded in stock transformers (test helper,
also used by bench/quant_load_check.py --fused).

``layouts(path)`` gives, for a tiny checkpoint whose routed experts are fused on disk (gpt-oss, Granite), the
compressed-tensors layouts a writer could produce: per-expert keys (``<block>.experts.<e>.<proj>.weight_packed``,
what moecompress writes for the other families) and the fused tensors packed under their disk names.
``try_layout`` writes one with its quantization_config and reports what ``from_pretrained`` made of it.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

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


def layouts(path: Path) -> dict[str, tuple[dict[str, torch.Tensor], list[str]]]:
    """name -> (every tensor of the checkpoint, routed experts quantized in that layout; compressed-tensors targets)."""
    ck = Checkpoint(path)
    fam = ck.family
    disk = load_file(str(path / "model.safetensors"))
    fused = {k for l in ck.moe_layers for k in disk if fam.routed_key_pattern(l).match(k) and disk[k].dim() == 3}
    rest = {k: v for k, v in disk.items() if k not in fused}
    per_expert = dict(rest)
    for l in ck.moe_layers:
        w = ck.moe_weights(l)
        pre = f"{fam.block_prefix(l)}{fam.experts}"
        for e in range(w.gate.shape[0]):
            for name, m in (("gate_proj", w.gate[e]), ("up_proj", w.up[e]), ("down_proj", w.down[e])):
                per_expert.update(pack(m.contiguous(), f"{pre}.{e}.{name}"))
    packed = dict(rest)
    for k in fused:
        packed.update(pack(disk[k], k.removesuffix(".weight")))
    return {
        "per-expert": (per_expert, [r"re:.*\.experts\.\d+\.(?:gate_proj|up_proj|down_proj)$"]),
        "fused (disk names)": (packed, [f"re:^{k.removesuffix('.weight')}$" for k in sorted(fused)]),
    }


def try_layout(src: Path, out: Path, tensors: dict[str, torch.Tensor], targets: list[str], dequant: bool) -> dict:
    """Write ``src`` with ``tensors`` and a compressed-tensors config, then ``from_pretrained`` it as a user would:
    {"loads", "missing", "unexpected", examples} or {"loads": False, "error"}."""
    from transformers import AutoModelForCausalLM

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for f in src.iterdir():
        if f.name not in ("model.safetensors", "config.json"):
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
            _, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
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
