"""Exact loader for moecompress quantized folders (compressed-tensors pack-quantized, any per-layer/per-expert widths).

Every ``*.weight_packed`` tensor is unpacked (on ``device``: on CUDA the unpacking runs on the GPU) and dequantized
as ``q * scale`` in the scale dtype, the same numbers compressed-tensors produces; per-expert hub keys are then
fused into the stock transformers modules (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``).

With ``packed=True`` (the default on CUDA) the routed experts are not dequantized at load time: each MoE layer's
experts module is replaced by :class:`~moecompress.quant.packed_experts.PackedExperts`, which keeps the int32 codes
and scales on ``device`` and dequantizes a hit expert on the fly (same numbers as the dense path; the memory of the
routed experts stays at their packed size). On CUDA with Triton installed its products run through the fused
dequantize-and-multiply kernel of :mod:`moecompress.quant.triton_pack` (same weights, float32 accumulation; see
``PackedExperts.kernel``). Routers, attention, shared experts and embeddings load as before.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from moecompress.core.errors import UserError
from moecompress.core.experts import experts_activation
from moecompress.quant import keys
from moecompress.quant.ctformat import scheme_of
from moecompress.quant.pack import unpack_int32
from moecompress.quant.packed_experts import PackedExperts
from moecompress.quant.rtn import dequantize

if TYPE_CHECKING:
    from moecompress.core.families import Family


def read_all(path: Path) -> dict[str, torch.Tensor]:
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


def split_routed(
    raw: dict[str, torch.Tensor], qconfig: dict, fam: Family, layers: list[int], num_experts: int
) -> tuple[dict[int, tuple[list[dict[str, tuple[torch.Tensor, torch.Tensor]]], list[int]]], dict[str, torch.Tensor]]:
    """Take the packed routed experts of every MoE layer in ``layers`` whose experts are all packed out of ``raw``.

    Returns ``({layer: (experts, bits)}, rest)``: ``experts[e] = {"gate"|"up"|"down": (packed, scale)}`` as stored,
    ``bits[e]`` the expert's width; ``rest`` is every other tensor (a layer with an unpacked expert stays in it).
    """
    rest = dict(raw)
    out: dict[int, tuple[list[dict[str, tuple[torch.Tensor, torch.Tensor]]], list[int]]] = {}
    for l in layers:
        bases = [[keys.expert_key(fam, l, e, p)[: -len(".weight")] for p in range(3)] for e in range(num_experts)]
        if not all(b + ".weight_packed" in rest for row in bases for b in row):
            continue
        if any(len({(scheme_of(qconfig, b) or (0,))[0] for b in row}) > 1 for row in bases):
            continue  # an expert with per-projection widths (a per-expert LP option): the layer stays dense
        experts, bits = [], []
        for e, row in enumerate(bases):
            entry: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
            widths = set()
            for name, base in zip(("gate", "up", "down"), row, strict=True):
                scheme = scheme_of(qconfig, base)
                if scheme is None:
                    raise UserError(
                        f"{base} is packed but no quantization_config group targets it: the folder is damaged"
                    )
                packed, scale = rest.pop(base + ".weight_packed"), rest.pop(base + ".weight_scale")
                rows, cols = (int(x) for x in rest.pop(base + ".weight_shape").tolist())
                if packed.shape[0] != rows or packed.shape[-1] != -(-cols * scheme[0] // 32):
                    raise UserError(
                        f"{base}: packed shape {tuple(packed.shape)} does not hold weight_shape {[rows, cols]}"
                    )
                widths.add(scheme[0])
                entry[name] = (packed, scale)
            if len(widths) != 1:
                raise UserError(f"layer {l} expert {e}: its projections have different widths {sorted(widths)}")
            experts.append(entry)
            bits.append(widths.pop())
        out[l] = (experts, bits)
    return out, rest


def fuse_sequential(
    state: dict[str, torch.Tensor], fam: Family, layers: list[int], num_experts: int
) -> dict[str, torch.Tensor]:
    """Llama-4's dequantized per-expert projections (``experts.<e>.gate_proj/up_proj/down_proj.weight``, the modules
    of SequentialLlama4TextExperts, ``quant/keys.py``) as the fused disk tensors its unquantized checkpoint holds
    (``gate_up_proj [E, H, 2I]``, ``down_proj [E, I, H]``, as Llama4TextExperts holds them); others unchanged."""
    if not keys.sequential(fam):
        return state
    out = dict(state)
    for l in layers:
        names = [[keys.expert_key(fam, l, e, p) for e in range(num_experts)] for p in range(3)]
        if not all(k in out for row in names for k in row):
            raise UserError(f"layer {l}: {names[0][0]} and the other routed experts are not all in the folder")
        gate, up, down = (torch.stack([out.pop(k) for k in row]) for row in names)  # [E, I, H] x2, [E, H, I]
        gu_key, down_key = keys.fused_keys(fam, l)
        out[gu_key] = torch.cat([gate, up], dim=1).transpose(1, 2).contiguous()  # [E, H, 2I]
        out[down_key] = down.transpose(1, 2).contiguous()  # [E, I, H]
    return out


def load_quantized(
    path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    packed: bool | None = None,
) -> PreTrainedModel:
    """Load a moecompress quantized folder exactly (weights = dequantized codes), in ``dtype`` (default float32).

    ``packed``: keep the routed experts packed and dequantize them on the fly (:class:`PackedExperts`); the same
    numbers, a fraction of the memory, some time per forward. ``None`` (default): packed on CUDA, dense on CPU
    (on CPU the per-forward unpacking costs more than the memory it saves is usually worth; see
    reports/quant_memory.md).
    """
    from moecompress.core.families import family_for
    from moecompress.core.stream import module_state

    p = Path(path)
    dtype = dtype or torch.float32
    if packed is None:
        packed = torch.device(device).type == "cuda"
    cfg_json = json.loads((p / "config.json").read_text())
    qconfig = cfg_json.get("quantization_config") or {}
    if qconfig.get("quant_method") == "mxfp4":  # gpt-oss experts written as MXFP4 (quant/mxfp4.py)
        from .mxfp4 import load_mxfp4

        return load_mxfp4(p, device, dtype)
    if qconfig.get("format") != "pack-quantized":
        raise UserError(f"{p} is not a pack-quantized compressed-tensors folder")
    config = AutoConfig.from_pretrained(p, trust_remote_code=False)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fam = family_for(config)
    if fam.nest is not None or keys.sequential(fam):  # a multimodal wrapper, or Llama-4's transposed experts
        return load_through_transformers(p, config, fam, qconfig, device, dtype, packed)
    moe = set(fam.moe_layers(config))
    E = fam.num_experts(config)
    raw = fam.view_names(read_all(p))  # (Nemotron-H: backbone.* -> model.*; quantization targets name modules)
    routed: dict[int, tuple[list[dict[str, tuple[torch.Tensor, torch.Tensor]]], list[int]]] = {}
    if packed:
        routed, raw = split_routed(raw, qconfig, fam, sorted(moe), E)
    state = dequantize_state(raw, qconfig, device)
    from moecompress.core.checkpoint import Checkpoint

    ck = Checkpoint(p)  # modules outside the layers renamed on disk (DeepSeek-V4's head.weight is lm_head.weight)
    state = {k if k.startswith("model.layers.") else ck.view_key(k): v for k, v in state.items()}
    module_sd: dict[str, torch.Tensor] = {}
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        if k.startswith("model.layers."):
            layers.setdefault(int(k.split(".")[2]), {})[k] = v
        else:
            module_sd[k] = v
    for l, tensors in layers.items():
        if l in routed:  # experts are PackedExperts: the rest (router included) only needs renaming
            for k, v in tensors.items():
                module_sd[fam.disk_to_module(k)] = v
            continue
        for k, v in module_state(fam, tensors, l, E if l in moe else None).items():
            if fam.gateless and k.endswith(f".{fam.experts}.gate_up_proj"):  # transformers' up_proj [E, I, H]
                k, v = k[: -len("gate_up_proj")] + "up_proj", v[:, v.shape[1] // 2 :]  # (the view's gate copies up)
            module_sd[f"model.layers.{l}.{k}"] = v
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False, experts_implementation="eager")
    _install_packed(model, "model", routed, fam, device, p)
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


def load_through_transformers(
    p: Path, config: Any, fam: Family, qconfig: dict, device: torch.device | str, dtype: torch.dtype, packed: bool
) -> PreTrainedModel:
    """A quantized folder whose modules moecompress does not fill itself: a multimodal wrapper (Qwen3.5-MoE,
    Qwen3-VL-MoE, GLM-4.5V, Gemma-4, DeepSeek-OCR-2, Unlimited-OCR, Llama-4) or Llama-4's text model (its experts
    module holds [E, H, 2I]). Every packed module is dequantized (``q * scale``, as compressed-tensors does; Llama-4's
    per-expert modules fused back: ``fuse_sequential``), then loaded by the class transformers maps the model type
    to (image-text-to-text for a wrapper), through ``from_pretrained(state_dict=...)``: transformers' own conversion
    mapping places the per-expert keys, the text model's disk names (DeepSeek-OCR-2's model.* is the module's
    model.language_model.*) and the vision tower exactly as for an unquantized folder, so no key mapping is repeated
    here; missing or unexpected keys are refused. ``packed``: the language model's routed experts are then replaced
    by :class:`PackedExperts` (not Llama-4's; the load itself peaks at the dense model's size)."""
    from moecompress.core.derive import wrapper_auto_class

    auto = wrapper_auto_class(config) or AutoModelForCausalLM
    raw = read_all(p)
    tcfg = config.get_text_config()
    moe, E = sorted(fam.moe_layers(tcfg)), fam.num_experts(tcfg)
    routed: dict[int, tuple[list[dict[str, tuple[torch.Tensor, torch.Tensor]]], list[int]]] = {}
    from moecompress.core.checkpoint import Checkpoint

    ck = Checkpoint(p)
    if packed and not keys.sequential(fam):  # (split_routed names experts as the view does: model.layers.N...)
        view = {ck.view_key(k): k for k in raw}
        routed, _ = split_routed({v: raw[k] for v, k in view.items()}, _view_qconfig(qconfig, ck), fam, moe, E)
    state = dequantize_state(raw, qconfig, device)
    if keys.sequential(fam):  # Llama-4: per-expert modules fused back into the disk tensors, under the view's names
        state = {ck.view_key(k): v for k, v in state.items()}
        state = {ck.disk_key(k): v for k, v in fuse_sequential(state, fam, moe, E).items()}
    with torch.device("meta"):  # (the Auto class needs a path; its model class takes a state dict alone)
        cls = type(auto.from_config(config, trust_remote_code=False))
    try:
        model, info = cls.from_pretrained(
            None, config=config, state_dict=state, experts_implementation="eager", dtype=dtype,
            output_loading_info=True,
        )  # fmt: skip
    except (OSError, ValueError, RuntimeError) as err:
        raise UserError(f"transformers cannot load {p}: {str(err).splitlines()[0]}") from None
    bad = {k: sorted(info[k])[:3] for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)}
    if bad:
        raise UserError(f"{p}: tensors do not match config.json ({bad})")
    _install_packed(model, fam.nest[0] if fam.nest else "model", routed, fam, device, p)
    return model.to(device).eval()


def _install_packed(
    model: torch.nn.Module, body: str, routed: dict, fam: Family, device: torch.device | str, p: Path
) -> None:
    """Replace each MoE layer's experts module under ``body``.layers.N by the :class:`PackedExperts` of its codes."""
    for l, (experts, bits) in routed.items():
        block = model.get_submodule(f"{body}.layers.{l}.{fam.module_block}")
        try:
            mod = PackedExperts.from_experts(experts, bits, experts_activation(getattr(block, fam.experts)), device)
        except ValueError as err:
            raise UserError(f"{p}: layer {l} routed experts: {err}: the folder is damaged") from None
        setattr(block, fam.experts, mod)


def _view_qconfig(qconfig: dict, ck: Any) -> dict:
    """``qconfig`` with its targets also naming the view's modules (model.layers.N... for the checkpoint's
    model.language_model.layers.N...), so ``scheme_of`` answers for view names."""
    out = json.loads(json.dumps(qconfig))
    for group in out.get("config_groups", {}).values():
        group["targets"] = [*group.get("targets", []), *(_to_view(t, ck) for t in group.get("targets", []))]
    out["ignore"] = [*out.get("ignore", []), *(_to_view(t, ck) for t in out.get("ignore", []))]
    return out


def _to_view(target: str, ck: Any) -> str:
    if ck.family.nest is None:
        return target
    body = ck._nest[0]
    if target.startswith("re:"):
        return target.replace(re.escape(f"{body}.layers."), re.escape("model.layers."))
    return ck.view_key(target + ".weight")[: -len(".weight")]
