"""Load a ``budget_exact`` output (per-layer expert counts, per-expert channel widths and bits) exactly.

On disk each kept routed expert is pack-quantized at its own bits and width (compressed-tensors, every module
listed in ``quantization_config``); ``moecompress.json``'s "budget" stage lists per layer the kept experts and
their widths. Every packed tensor is dequantized (``quant.load.dequantize_state``), then each MoE layer gets its
experts zero-padded to one width (``atomic.load``'s exact padding: a zero channel adds nothing) and its router.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from ..atomic.apply import ExactLayer
from ..atomic.load import set_padded
from ..core.errors import UserError
from ..core.families import family_for
from ..core.manifest import Manifest
from ..quant.load import dequantize_state, read_all


def _layer(state: dict, fam: Any, l: int, n: int, dtype: torch.dtype, kept: list[int]) -> ExactLayer:
    """Layer ``l``'s n experts (own widths) and router from the dequantized state."""

    def get(k: str) -> torch.Tensor:
        return state[k].to(dtype)

    def opt(what: str) -> torch.Tensor | None:
        return get(fam.router_key(l, what)) if fam.router_key(l, what) in state else None

    return ExactLayer(
        gate=[get(fam.expert_key(l, e, 0)) for e in range(n)],
        up=[get(fam.expert_key(l, e, 1)) for e in range(n)],
        down=[get(fam.expert_key(l, e, 2)) for e in range(n)],
        router=get(fam.router_key(l)),
        router_bias=opt("bias") if fam.router_bias else None,
        correction_bias=opt(fam.correction_bias) if fam.correction_bias else None,
        kept_experts=kept,
        kept_channels=[],
    )


def load_budget(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> PreTrainedModel:
    p = Path(path)
    man = Manifest.read(p)
    section = man.stage("budget") if man is not None else None
    try:
        assert section is not None
        layers = {int(l): v for l, v in section["layers"].items()}
        qconfig = json.loads((p / "config.json").read_text())["quantization_config"]
    except (AssertionError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise UserError(f"{p} has no readable budget plan ({err!r}): it is not a budget_exact output") from None
    dtype = dtype or torch.float32
    config = AutoConfig.from_pretrained(p, trust_remote_code=False)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fam = family_for(config)
    state = dequantize_state(fam.view_names(read_all(p)), qconfig, "cpu")  # (Nemotron-H: backbone.* -> model.*)
    patterns = [fam.routed_key_pattern(l) for l in layers]
    rest = {fam.disk_to_module(k): v.to(dtype) for k, v in state.items() if not any(q.match(k) for q in patterns)}
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False, experts_implementation="eager")
    missing, unexpected = model.load_state_dict(rest, strict=False, assign=True)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    left = {k for k in missing if not any(q.match(k) for q in patterns)} - tied
    if left or unexpected:
        raise UserError(f"{p}: weights do not match the config (missing {sorted(left)[:3]}, extra {unexpected[:3]})")
    for l, info in layers.items():
        try:
            ex = _layer(state, fam, l, len(info["kept_experts"]), dtype, list(info["kept_experts"]))
        except KeyError as err:
            raise UserError(f"{p}: layer {l} misses {err}: the folder is damaged") from None
        if ex.widths != list(info["widths"]) or ex.router.shape[0] != len(info["kept_experts"]):
            raise UserError(f"{p}: layer {l} expert widths on disk {ex.widths} differ from moecompress.json")
        set_padded(getattr(model.model.layers[l], fam.module_block), fam, ex)
    if tied:
        model.tie_weights()
    still_meta = [name for name, t in model.named_parameters() if t.is_meta]
    if still_meta:
        raise UserError(f"{p}: no weights on disk for {still_meta[:3]}")
    return model.to(device=device, dtype=dtype).eval()
