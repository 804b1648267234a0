"""Load an exact-layout atomic-pruned folder (per-expert widths) as a stock transformers model, exactly.

On disk each routed expert keeps its own width (hub per-expert keys, e.g. ``mlp.experts.3.gate_proj.weight
[K_e, H]``); experts left with no channel are gone from the layer (router rows removed, experts renumbered).
moecompress.json records per layer ``kept_experts`` and ``widths`` (its "atom" stage section). The model is built
on the meta device (accelerate's init_empty_weights) and given the weights on disk; in memory every layer's
experts are zero-padded to one width per layer (the widest, rounded up to 16; config.json keeps the source width,
which shared experts may derive from): a padded channel has gate = up = 0 (act(0) * 0 = 0) and a zero down
column, so it adds exactly nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from ..core.checkpoint import Checkpoint
from ..core.errors import UserError
from ..core.families import family_for
from ..core.manifest import Manifest
from .apply import ExactLayer, pad_exact, padded_width

LAYOUT = "atomic_exact"


def _read_layer(ckpt: Checkpoint, fam: Any, l: int, info: dict[str, Any], dtype: torch.dtype) -> ExactLayer:
    """Layer ``l``'s experts (unequal widths) and router as written, checked against the manifest's widths."""
    n = len(info["kept_experts"])
    get = lambda key: ckpt.get(key).to(dtype)  # noqa: E731
    opt = lambda what: get(fam.router_key(l, what)) if fam.router_key(l, what) in ckpt.weight_map else None  # noqa: E731
    ex = ExactLayer(
        gate=[get(fam.expert_key(l, e, 0)) for e in range(n)],  # [K_e, H] each
        up=[get(fam.expert_key(l, e, 1)) for e in range(n)],  # [K_e, H] each
        down=[get(fam.expert_key(l, e, 2)) for e in range(n)],  # [H, K_e] each
        router=get(fam.router_key(l)),  # [E', H]
        router_bias=opt("bias") if fam.router_bias else None,
        correction_bias=opt(fam.correction_bias) if fam.correction_bias else None,
        kept_experts=list(info["kept_experts"]),
        kept_channels=[],
    )
    if ex.widths != list(info["widths"]):
        raise UserError(f"{ckpt.path}: layer {l} expert widths on disk {ex.widths} differ from moecompress.json")
    return ex


def set_padded(block: torch.nn.Module, fam: Any, ex: ExactLayer) -> None:
    """Give the MoE block the layer's experts zero-padded to one width (exact) and its router."""
    width = padded_width(ex.widths)
    w = pad_exact(ex, width)
    experts, router = getattr(block, fam.experts), fam.router_of(block)
    if fam.gateless and hasattr(experts, "up_proj"):  # transformers' gateless experts (Nemotron-H): up_proj [E', W, H]
        experts.up_proj = torch.nn.Parameter(w.up, requires_grad=False)  # (zero rows: relu^2(0) = 0, exact)
    else:
        experts.gate_up_proj = torch.nn.Parameter(torch.cat([w.gate, w.up], dim=1), requires_grad=False)  # [E', 2W, H]
    experts.down_proj = torch.nn.Parameter(w.down, requires_grad=False)  # [E', H, W]
    experts.num_experts = len(ex.gate)
    if hasattr(experts, "intermediate_dim"):
        experts.intermediate_dim = width
    router.weight = torch.nn.Parameter(w.router, requires_grad=False)
    if w.router_bias is not None:
        router.bias = torch.nn.Parameter(w.router_bias, requires_grad=False)
    if w.correction_bias is not None:
        fam.set_correction(block, w.correction_bias)
    if hasattr(router, "num_experts"):
        router.num_experts = len(ex.gate)


def load_exact_atomic(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> PreTrainedModel:
    """Rebuild the model of an ``atomic_exact`` output folder (see module docstring)."""
    path = Path(path)
    man = Manifest.read(path)
    section = man.stage("atom") if man is not None else None
    try:
        assert section is not None
        layers = {int(l): v for l, v in section["layers"].items()}
    except (AssertionError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise UserError(
            f"{path} has no readable atomic-pruning manifest ({err!r}): it is not an atomic_exact output"
        ) from None
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    fam = family_for(config)
    with init_empty_weights(include_buffers=False):  # parameters on the meta device until the weights are assigned
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False, experts_implementation="eager")
    dtype = dtype or torch.float32
    ckpt = Checkpoint(path)
    patterns = [fam.routed_key_pattern(l) for l in layers]
    state = {fam.disk_to_module(k): ckpt.get(k).to(dtype) for k in ckpt.keys() if not any(p.match(k) for p in patterns)}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    left = {k for k in missing if not any(p.match(k) for p in patterns)} - tied
    if left or unexpected:
        raise UserError(f"{path}: weights do not match the config (missing {sorted(left)[:3]}, extra {unexpected[:3]})")
    for l, info in layers.items():
        set_padded(getattr(model.model.layers[l], fam.module_block), fam, _read_layer(ckpt, fam, l, info, dtype))
    if tied:
        model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise UserError(f"{path}: no weights on disk for {still_meta[:3]}")
    return model.to(device=device, dtype=dtype).eval()
