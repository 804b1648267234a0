"""Load expert-pruned folders whose MoE layers keep different numbers of experts (layout "per-layer"), exactly.

On disk every MoE layer l holds hub per-expert keys for experts 0..k_l-1 plus a router of k_l rows;
``config.json`` carries the largest k_l and ``moecompress.json`` lists each layer's kept experts. The loader builds
the stock transformers model from the config on the meta device, loads every other tensor, then gives each MoE
layer its own fused expert parameters ``gate_up_proj [k_l, 2I, H]``, ``down_proj [k_l, H, I]``, router rows and
biases, and sets the modules' own ``num_experts`` (their forward reads it). Nothing is padded: it is exact.

``set_block_experts`` is also how a model in memory is pruned (``prune_in_memory``, ``PruneTransform``).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from ..core.checkpoint import Checkpoint
from ..core.errors import UserError
from ..core.families import Family, MoEWeights, family_for
from ..core.manifest import Manifest

LAYOUT = "per-layer"


def set_block_experts(
    block: nn.Module, fam: Family, w: MoEWeights, layer: int = -1, gate_up: torch.Tensor | None = None
) -> None:
    """Replace one MoE block's routed experts and router by ``w`` (k experts) and set the modules' counts.

    ``gate_up``: the [k, 2I, H] tensor whose halves ``w.gate`` and ``w.up`` are (``select_experts``): the block
    holds it as it is instead of a concatenated copy."""
    experts, router = getattr(block, fam.experts), fam.router_of(block)
    k = w.num_experts
    if gate_up is None or not (_is_half(w.gate, gate_up, 0) and _is_half(w.up, gate_up, 1)):
        gate_up = torch.cat([w.gate, w.up], dim=1)
    if fam.gateless and hasattr(experts, "up_proj"):  # transformers' gateless experts (Nemotron-H): up_proj [k, I, H]
        experts.up_proj = nn.Parameter(w.up.contiguous(), requires_grad=False)
    else:
        experts.gate_up_proj = nn.Parameter(gate_up, requires_grad=False)  # [k, 2I, H]
    experts.down_proj = nn.Parameter(w.down.contiguous(), requires_grad=False)  # [k, H, I]
    experts.num_experts = k
    if w.gate_bias is not None and w.up_bias is not None and hasattr(experts, "gate_up_bias"):  # BiasedExperts
        experts.gate_up_bias = nn.Parameter(torch.cat([w.gate_bias, w.up_bias], dim=1), requires_grad=False)
        experts.down_bias = nn.Parameter(w.down_bias.contiguous(), requires_grad=False)
    router.weight = nn.Parameter(w.router.contiguous(), requires_grad=False)  # [k, H]
    if w.router_bias is not None:
        router.bias = nn.Parameter(w.router_bias.contiguous(), requires_grad=False)
    if fam.correction_bias and not (w.correction_bias is None and layer in fam.hash_layers):  # (DeepSeek-V4's hash
        if w.correction_bias is None:  # routers hold no correction bias: their table picks the experts)
            raise UserError(f"layer {layer}: the {fam.name} router needs its {fam.correction_bias} tensor")
        fam.set_correction(block, w.correction_bias)  # the router's buffer (DeepSeek) or where the family holds it
    if fam.expert_scale:  # Gemma-4's router.per_expert_scale [k] (kept as it is when the experts stay the same)
        owner, _, leaf = fam.expert_scale.rpartition(".")
        if w.expert_scale is not None:
            setattr(block.get_submodule(owner), leaf, nn.Parameter(w.expert_scale.contiguous(), requires_grad=False))
        elif block.get_parameter(fam.expert_scale).shape[0] != k:
            raise UserError(f"layer {layer}: the {fam.name} experts were renumbered without their {fam.expert_scale}")
    if hasattr(router, "num_experts"):
        router.num_experts = k


def _is_half(t: torch.Tensor, fused: torch.Tensor, half: int) -> bool:
    """``t`` is exactly ``fused[:, :I]`` (half 0) or ``fused[:, I:]`` (half 1) of ``fused`` [k, 2I, H]."""
    I = fused.shape[1] // 2
    view = fused[:, half * I : (half + 1) * I]
    return (
        t.dtype == fused.dtype and t.shape == view.shape and t.stride() == view.stride()
        and t.data_ptr() == view.data_ptr()
    )  # fmt: skip


def kept_gate_up(w: MoEWeights, keep: list[int]) -> torch.Tensor:
    """The kept experts' gate and up rows copied once, expert by expert, into one fused [k, 2I, H] tensor."""
    k, (I, H) = len(keep), w.gate.shape[1:]
    gate_up = torch.empty((k, 2 * I, H), dtype=w.gate.dtype, device=w.gate.device)  # [k, 2I, H]
    for j, e in enumerate(keep):
        gate_up[j, :I] = w.gate[e]
        gate_up[j, I:] = w.up[e]
    return gate_up


def select_experts(
    w: MoEWeights, keep: list[int], gate_up: torch.Tensor | None = None
) -> tuple[MoEWeights, torch.Tensor]:
    """``w.select(keep)`` with the kept experts' gate and up rows copied once, expert by expert, into one fused
    [k, 2I, H] tensor (returned too) whose halves are the selection's gate and up: with ``set_block_experts(...,
    gate_up=)`` the block holds that one copy (``select`` + the block's concatenation made two, and a temporary).
    ``gate_up``: that tensor made already (``kept_gate_up``; ``w.gate`` and ``w.up`` are then not read)."""
    if gate_up is None:
        gate_up = kept_gate_up(w, keep)
    I = gate_up.shape[1] // 2
    idx = torch.as_tensor(keep, dtype=torch.long, device=w.router.device)
    pick = lambda t: None if t is None else t.index_select(0, idx.to(t.device))  # noqa: E731
    sel = replace(
        w, gate=gate_up[:, :I], up=gate_up[:, I:], down=pick(w.down), router=pick(w.router),
        router_bias=pick(w.router_bias), correction_bias=pick(w.correction_bias), gate_bias=pick(w.gate_bias),
        up_bias=pick(w.up_bias), down_bias=pick(w.down_bias), expert_scale=pick(w.expert_scale),
    )  # fmt: skip
    return sel, gate_up


def block_view(block: nn.Module, fam: Family) -> MoEWeights:
    """The per-layer view of a transformers MoE block as it is now (its own tensors, not copies)."""
    experts, router = getattr(block, fam.experts), fam.router_of(block)
    I = experts.down_proj.shape[-1]
    gu = experts.gate_up_proj.data  # [E, 2I, H]
    gub = getattr(experts, "gate_up_bias", None)  # [E, 2I] (BiasedExperts)
    biases = {}
    if gub is not None:
        biases = dict(gate_bias=gub.data[:, :I], up_bias=gub.data[:, I:], down_bias=experts.down_bias.data)
    return MoEWeights(
        gate=gu[:, :I],
        up=gu[:, I:],
        down=experts.down_proj.data,
        router=router.weight.data,
        router_bias=router.bias.data if getattr(router, "bias", None) is not None else None,
        correction_bias=fam.correction_of(block),
        expert_scale=block.get_parameter(fam.expert_scale).data if fam.expert_scale else None,
        **biases,
    )


def set_layer_experts(model: nn.Module, fam: Family, layer: int, w: MoEWeights) -> None:
    """``set_block_experts`` on decoder layer ``layer`` of a transformers model."""
    set_block_experts(getattr(model.model.layers[layer], fam.module_block), fam, w, layer)


def layer_view(model: nn.Module, fam: Family, layer: int) -> MoEWeights:
    """``block_view`` of decoder layer ``layer`` of a transformers model."""
    return block_view(getattr(model.model.layers[layer], fam.module_block), fam)


def kept_lists(path: Path) -> dict[int, list[int]]:
    """Each MoE layer's kept experts (original indices) from the folder's moecompress.json (its prune stage)."""
    manifest = Manifest.read(path)
    section = manifest.stage("prune") if manifest is not None else None
    if section is None:
        raise UserError(f"{path}/moecompress.json has no prune stage: not an expert-pruning output")
    try:
        return {int(l): [int(e) for e in v["kept"]] for l, v in section["layers"].items()}
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise UserError(
            f"{path}/moecompress.json has no per-layer kept-expert lists ({err}): not a prune output"
        ) from None


@torch.no_grad()
def prune_in_memory(model: nn.Module, kept: dict[int, list[int]]) -> nn.Module:
    """Keep only ``kept[l]`` (original indices, renumbered 0..k-1 in this order) in each listed MoE layer."""
    fam = family_for(model.config)
    for l, keep in kept.items():
        set_layer_experts(model, fam, l, layer_view(model, fam, l).select(keep))
    return model


@torch.no_grad()
def load_per_layer(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> PreTrainedModel:
    """Rebuild a per-layer expert-pruned folder as a stock transformers model (see the module docstring)."""
    path = Path(path)
    counts = {l: len(kept) for l, kept in kept_lists(path).items()}
    dtype = dtype or torch.float32
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    fam = family_for(config)
    ckpt = Checkpoint(path)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False, experts_implementation="eager")
    patterns = [fam.routed_key_pattern(l) for l in counts]
    state = {fam.disk_to_module(k): ckpt.get(k).to(dtype) for k in ckpt.keys() if not any(p.match(k) for p in patterns)}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    left = {k for k in missing if not any(p.match(k) for p in patterns)} - tied
    if left or unexpected:
        raise UserError(
            f"{path}: weights do not match config.json (missing {sorted(left)[:3]}, extra {unexpected[:3]})"
        )
    for l, k in counts.items():
        pat = fam.routed_key_pattern(l)
        tensors = {key: ckpt.get(key).to(dtype) for key in ckpt.keys() if pat.match(key)}
        extra = [key for key in tensors if f".{fam.experts}.{k}." in key]
        if extra:
            raise UserError(f"{path}: layer {l} has more experts on disk than moecompress.json lists ({k})")
        w = fam.read_layer(tensors, l, k)
        if w.router.shape[0] != k:
            raise UserError(f"{path}: layer {l} router has {w.router.shape[0]} rows, moecompress.json lists {k}")
        set_layer_experts(model, fam, l, w)
    if tied:
        model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise UserError(f"{path}: no weights on disk for {still_meta[:3]}")
    return model.to(device=device, dtype=dtype).eval()
