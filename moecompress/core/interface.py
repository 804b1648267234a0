"""moecompress's experts implementation, registered in transformers' ``ExpertsInterface``.

Every transformers experts class wrapped by ``use_experts_implementation`` dispatches its forward
``experts(hidden_states, top_k_index, top_k_weights)`` through ``ExpertsInterface`` by
``config._experts_implementation``. moecompress registers ``"moecompress"`` there: while the engine observes a
layer (profile statistics, GPTQ Hessians, ...), that layer's experts module dispatches to it and it computes the
experts with the engine's observing forward (``experts.routed_forward``: the eager operations, same order, with
each expert's unweighted output shown to the observers); an experts module with no observation in progress runs
transformers' own eager forward, unchanged. Routing (softmax / sigmoid, correction bias, groups, normalization)
always comes from the family's own MoE block, which calls the experts module.

    with observing(experts, fwd):   # fwd(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]
        layer(...)                  # the block routes; its experts module dispatches to fwd

Experts modules that do not dispatch through the interface (moecompress's own ``BiasedExperts`` of gpt-oss, or a
layout ``routed_forward`` does not compute: transposed, interleaved, biased, gate-less experts, post-expert norms or
a family's own gate) get their ``forward`` replaced for the observation instead (:func:`dispatches` says which).
The layer stream's narrowed experts (weights held in the checkpoint's dtype, core/stream.py) are observed through
the interface as the transformers class they narrow.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers.integrations.moe import ExpertsInterface, _default_apply_gate, use_experts_implementation

from .experts import routed_forward

NAME = "moecompress"

Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

_ACTIVE: dict[int, Forward] = {}  # id(experts module) -> the observing forward of the observation in progress

# use_experts_implementation flags under which routed_forward computes what transformers' eager forward does
_STANDARD = {
    "is_transposed": False,
    "is_concatenated": True,
    "has_bias": False,
    "has_gate": True,
    "has_post_expert_norm": False,
}


def _eager(cls: type) -> Callable[..., torch.Tensor] | None:
    """The family's own eager forward under ``use_experts_implementation`` (None when ``cls`` does not dispatch)."""
    fwd = getattr(cls, "forward", None)
    return getattr(fwd, "__wrapped__", None)


def experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The ``"moecompress"`` experts implementation: the observing forward while an observation of this module is
    in progress, else transformers' eager forward of the module's class."""
    fwd = _ACTIVE.get(id(self))
    if fwd is not None:
        return fwd(hidden_states, top_k_index, top_k_weights)
    eager = _eager(type(self))
    if eager is None:
        raise TypeError(f"{type(self).__name__} is not an experts class of transformers' ExpertsInterface")
    return eager(self, hidden_states, top_k_index, top_k_weights)


ExpertsInterface.register(NAME, experts_forward)


def _interface_class(experts: nn.Module) -> type | None:
    """The class through which ``experts`` dispatches to ``ExpertsInterface`` with a layout ``routed_forward``
    computes: its own, or for the layer stream's narrowed class (``narrow_of``: forward overridden to upcast weights
    held in the checkpoint's dtype) the transformers class it narrows; None when there is none."""
    cls = vars(type(experts)).get("narrow_of", type(experts))
    if _eager(cls) is None or getattr(experts, "config", None) is None:
        return None
    if any(getattr(experts, k, None) is not v for k, v in _STANDARD.items()):
        return None
    return cls if getattr(cls, "_apply_gate", None) is _default_apply_gate else None


def dispatches(experts: nn.Module) -> bool:
    """The module is observed through ``ExpertsInterface`` (see :func:`observing`)."""
    return _interface_class(experts) is not None


@contextmanager
def observing(experts: nn.Module, fwd: Forward) -> Iterator[str]:
    """Run ``experts`` as ``fwd`` inside the block: through ``ExpertsInterface`` (yields "interface") where the
    module dispatches there (a narrowed module runs as its transformers class meanwhile: ``fwd`` upcasts per expert
    as the narrowed forward does), else by replacing its ``forward`` (yields "patch")."""
    cls = _interface_class(experts)
    if cls is None:
        experts.forward = fwd
        try:
            yield "patch"
        finally:
            del experts.forward
        return
    own = type(experts)
    cfg: Any = experts.config  # what the module's forward reads; only this config, not its sub-configs
    before = cfg._experts_implementation_internal
    experts.__class__ = cls
    cfg._experts_implementation_internal = NAME
    _ACTIVE[id(experts)] = fwd
    try:
        yield "interface"
    finally:
        _ACTIVE.pop(id(experts), None)
        cfg._experts_implementation_internal = before
        experts.__class__ = own


@use_experts_implementation
class ScaledInputExperts(nn.Module):
    """Routed experts whose router score multiplies the token copy *before* the expert (Llama-4), in the view's
    layout (``gate_up_proj [E, 2I, H]`` gate rows first, ``down_proj [E, H, I]``), as a transformers experts class
    (``use_experts_implementation``: it dispatches through ``ExpertsInterface`` like every other family's):
    ``forward(hidden [n, H], top_k_index [n, k], top_k_weights [n, k])``, the eager computation. ``ScaledInputMoe``
    calls it with the token copies already multiplied by their score (what the expert sees: g x) and weight 1 (the
    expert's output is added unweighted), so every observer of the routed computation sees the expert's true input,
    intermediate activation and output: h = act(W_gate g x) * (W_up g x), f = W_down h (the expert's contribution)."""

    def __init__(self, config: Any, E: int, H: int, I: int, act_fn: Callable[..., torch.Tensor], like: torch.Tensor):
        super().__init__()
        self.num_experts = E
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H, device=like.device, dtype=like.dtype))
        self.down_proj = nn.Parameter(torch.empty(E, H, I, device=like.device, dtype=like.dtype))
        self.act_fn = act_fn

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        return routed_forward(self.gate_up_proj, self.down_proj, self.act_fn, hidden, top_k_index, top_k_weights)


class ScaledInputMoe(nn.Module):
    """Llama-4's MoE block (``Llama4TextMoe``: top-k of the router logits, sigmoid of those logits as scores, the
    token copies multiplied by their score before the experts, a shared expert added) on the experts interface.

    The same computation as transformers' block (which runs every expert on every token, the unrouted copies
    multiplied by 0): ``router`` and ``shared_expert`` are the transformers modules themselves; the routed experts
    are ``ScaledInputExperts`` called with the routed copies only (an unrouted copy is 0 and a gated MLP without
    biases maps 0 to 0, so dropping them changes no value). Returns (output, router logits) as the block does."""

    scaled_input = True

    def __init__(self, block: nn.Module, config: Any):
        super().__init__()
        old = block.experts
        E, H, I2 = old.gate_up_proj.shape  # transformers keeps them transposed: [E, H, 2I], down [E, I, H]
        self.top_k, self.hidden_dim, self.num_experts = block.top_k, block.hidden_dim, E
        self.experts = ScaledInputExperts(config, E, H, I2 // 2, old.act_fn, old.gate_up_proj)
        self.router = block.router
        self.shared_expert = block.shared_expert

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = hidden_states.reshape(-1, self.hidden_dim)  # [T, H]
        scores, logits = self.router(x)  # [T, E]: sigmoid of the top-k logits, sigmoid(-inf) = 0 elsewhere
        idx = torch.topk(logits, self.router.top_k, dim=1)[1]  # [T, k]: the router's own top-k, recomputed alike
        p = scores.gather(1, idx)  # [T, k]
        T, k = idx.shape
        copies = (x.unsqueeze(1) * p.unsqueeze(-1)).reshape(T * k, -1)  # [T k, H]: what each expert sees
        ones = torch.ones((T * k, 1), dtype=x.dtype, device=x.device)
        routed = self.experts(copies, idx.reshape(T * k, 1), ones)  # [T k, H]
        out = self.shared_expert(x)
        out.add_(routed.reshape(T, k, -1).sum(dim=1))
        return out, logits


# Gemma-4: the decoder layer holds its router and routed experts itself (no MoE block module) and runs them beside
# its dense MLP: the view's block is ``DecoderLayerMoe`` (``decoder_layer_blocks``), holding those modules under
# ``<layer>.moe``; the layer's forward is transformers' with that one call in place of the inline routed path
BLOCK = "moe"
_LAYER_PARTS = ("router", "experts", "pre_feedforward_layernorm_2", "post_feedforward_layernorm_2")


class DecoderLayerMoe(nn.Module):
    """Gemma-4's routed path as a MoE block (``Gemma4TextDecoderLayer``'s own modules, moved here): the router
    reads the layer's residual stream (its own RMS norm, scale, softmax, top-k, renormalization, per-expert scale),
    the experts read ``pre_feedforward_layernorm_2`` of it, and ``post_feedforward_layernorm_2`` normalizes their
    sum; the layer adds this to its dense MLP's output. ``forward(residual [B, S, H]) -> [B, S, H]``: the same
    operations in the same order as the layer's inline code."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        for name in _LAYER_PARTS:
            setattr(self, name, getattr(layer, name))

    def forward(self, residual: torch.Tensor) -> torch.Tensor:
        flat = residual.reshape(-1, residual.shape[-1])
        _, top_k_weights, top_k_index = self.router(flat)
        hidden = self.pre_feedforward_layernorm_2(flat)
        hidden = self.experts(hidden, top_k_index, top_k_weights)
        return self.post_feedforward_layernorm_2(hidden.reshape(residual.shape))


def _layer_forward(
    self: Any,
    hidden_states: torch.Tensor,
    per_layer_input: torch.Tensor | None = None,
    shared_kv_states: Any = None,
    position_embeddings: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    past_key_values: Any = None,
    **kwargs: Any,
) -> torch.Tensor:
    """``Gemma4TextDecoderLayer.forward`` (transformers 5.23) with the routed path as ``self.moe(residual)``."""
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    hidden_states, _ = self.self_attn(
        hidden_states=hidden_states,
        position_embeddings=position_embeddings,
        attention_mask=attention_mask,
        shared_kv_states=shared_kv_states,
        position_ids=position_ids,
        past_key_values=past_key_values,
        **kwargs,
    )
    hidden_states = self.post_attention_layernorm(hidden_states)
    hidden_states = residual + hidden_states

    residual = hidden_states
    hidden_states = self.pre_feedforward_layernorm(hidden_states)
    hidden_states = self.mlp(hidden_states)
    hidden_states = self.post_feedforward_layernorm_1(hidden_states) + self.moe(residual)
    hidden_states = self.post_feedforward_layernorm(hidden_states)
    hidden_states = residual + hidden_states

    if self.hidden_size_per_layer_input:
        residual = hidden_states
        hidden_states = self.per_layer_input_gate(hidden_states)
        hidden_states = self.act_fn(hidden_states)
        hidden_states = hidden_states * per_layer_input
        hidden_states = self.per_layer_projection(hidden_states)
        hidden_states = self.post_per_layer_input_norm(hidden_states)
        hidden_states = residual + hidden_states

    hidden_states *= self.layer_scalar
    return hidden_states


_LAYER_CLASSES: dict[type, type] = {}


def _gemma4_reference() -> tuple[str, str, str]:
    """Normalized sources of transformers' Gemma-4 (decoder layer, router, experts): what ``_layer_forward`` and
    ``DecoderLayerMoe`` compute."""
    from transformers.models.gemma4 import modeling_gemma4 as g4

    from .derive import _norm_source_of

    return tuple(_norm_source_of(c) for c in (g4.Gemma4TextDecoderLayer, g4.Gemma4TextRouter, g4.Gemma4TextExperts))


def decoder_layer_blocks(model: nn.Module) -> int:
    """Give every decoder layer that holds its router and experts itself, with the code of transformers' Gemma-4
    (layer, router and experts classes equal to ``Gemma4TextDecoderLayer`` / ``Gemma4TextRouter`` /
    ``Gemma4TextExperts`` up to names), a ``DecoderLayerMoe`` at ``<layer>.moe`` holding them and the layer's forward
    calling it; returns how many layers changed (a Gemma-4 layer with ``enable_moe_block`` off has no router)."""
    from .derive import _norm_source_of

    ref, n = None, 0
    for mod in list(model.modules()):
        if not all(isinstance(getattr(mod, p, None), nn.Module) for p in _LAYER_PARTS):
            continue
        ref = ref or _gemma4_reference()
        if tuple(_norm_source_of(type(m)) for m in (mod, mod.router, mod.experts)) != ref:
            continue
        block = DecoderLayerMoe(mod)
        for name in _LAYER_PARTS:
            del mod._modules[name]
        setattr(mod, BLOCK, block)
        cls = type(mod)
        if cls not in _LAYER_CLASSES:
            _LAYER_CLASSES[cls] = type(cls.__name__, (cls,), {"forward": _layer_forward, "block_of": cls})
        mod.__class__ = _LAYER_CLASSES[cls]
        n += 1
    return n
