"""Exact loader for moecompress quantized folders (compressed-tensors pack-quantized, any per-layer/per-expert widths).

Every ``*.weight_packed`` tensor is unpacked (on ``device``: on CUDA the unpacking runs on the GPU) and dequantized
as ``q * scale`` in the scale dtype, the same numbers compressed-tensors produces; per-expert hub keys are then
fused into the stock transformers modules (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from moecompress.errors import UserError
from moecompress.quant.ctformat import scheme_of
from moecompress.quant.pack import unpack_int32
from moecompress.quant.rtn import dequantize


def _read_all(path: Path) -> dict[str, torch.Tensor]:
    idx = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(idx.read_text())["weight_map"].values())) if idx.exists() else ["model.safetensors"]
    out: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(path / f), framework="pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def dequantize_state(
    raw: dict[str, torch.Tensor], qconfig: dict, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Replace every ``X.weight_packed/weight_scale/weight_shape`` triple by ``X.weight`` (dtype of the scale)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in raw.items():
        if k.endswith((".weight_scale", ".weight_shape")):
            continue
        if not k.endswith(".weight_packed"):
            out[k] = v
            continue
        base = k[: -len(".weight_packed")]
        scheme = scheme_of(qconfig, base)
        if scheme is None:
            raise UserError(f"{base} is packed but no quantization_config group targets it: the folder is damaged")
        bits, _ = scheme
        rows, cols = (int(x) for x in raw[base + ".weight_shape"].tolist())
        scale = raw[base + ".weight_scale"].to(device)  # [R, C / g]
        g = cols // scale.shape[-1]
        q = unpack_int32(v.to(device), bits, cols)  # [R, C]
        if q.shape[0] != rows:
            raise UserError(f"{base}: packed rows {q.shape[0]} != weight_shape {rows}: the folder is damaged")
        out[base + ".weight"] = dequantize(q, scale, g)
    return out


def load_quantized(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> PreTrainedModel:
    """Load a moecompress quantized folder exactly (weights = dequantized codes), in ``dtype`` (default float32)."""
    from moecompress.adapters import family_for
    from moecompress.stream import module_state

    p = Path(path)
    dtype = dtype or torch.float32
    cfg_json = json.loads((p / "config.json").read_text())
    qconfig = cfg_json.get("quantization_config") or {}
    if qconfig.get("format") != "pack-quantized":
        raise UserError(f"{p} is not a pack-quantized compressed-tensors folder")
    config = AutoConfig.from_pretrained(p, trust_remote_code=False)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fam = family_for(config)
    state = dequantize_state(_read_all(p), qconfig, device)
    moe = set(fam.moe_layers(config))
    E = fam.num_experts(config)
    module_sd: dict[str, torch.Tensor] = {}
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        if k.startswith("model.layers."):
            layers.setdefault(int(k.split(".")[2]), {})[k] = v
        else:
            module_sd[k] = v
    for l, tensors in layers.items():
        for k, v in module_state(fam, tensors, l, E if l in moe else None).items():
            module_sd[f"model.layers.{l}.{k}"] = v
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False, experts_implementation="eager")
    own = model.state_dict()
    sd = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in module_sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = [m for m in missing if m not in tied and own[m].device.type == "meta"]
    if missing or unexpected:
        raise UserError(f"{p}: tensors do not match config.json (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if tied:
        model.tie_weights()
    model.to(device)
    return model.eval()
