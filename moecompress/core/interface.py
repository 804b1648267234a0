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
from transformers.integrations.moe import ExpertsInterface, _default_apply_gate

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
