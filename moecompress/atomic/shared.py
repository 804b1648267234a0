"""Shared experts sized from the routed experts' width key, kept exact when the uniform layout narrows that key.

    pad = shared_padding(config, "moe_intermediate_size", K, ".experts.")  # None: nothing else is sized by the key
    pad.config(cfg)              # n_shared_experts: ceil(I_shared / K)
    pad.pad(key, tensor)         # a shared expert's tensor zero-padded to K * n' channels (None: not one of them)

DeepSeek-style shared experts are built with width ``moe_intermediate_size * n_shared_experts``: when the routed
experts narrow to K, the count key becomes n' = ceil(I_shared / K) and the shared experts get K * n' - I_shared zero
channels (zero gate/up rows, zero down columns): their output is exactly the same (each extra channel adds
down[:, j] * h_j = 0), at a cost below one routed expert's width per layer. The count key is found on the
meta-model (``expected_shapes``): an integer config key whose value times the width is the moved module's width,
and which, set to n', gives every moved tensor K * n' channels and changes nothing else. Where no key does (a dense
MLP or a shared MLP sized by the width key itself: Jamba, Hunyuan, Llama-4), ``refusal`` names the module.
"""

from __future__ import annotations

import copy
import math
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.checkpoint import expected_shapes

MAX_TRIES = 12  # candidate count keys built on the meta device (names with "shared" first)


@dataclass
class SharedPadding:
    """How the tensors sized by the width key besides the routed experts follow a narrower uniform width.

    key: the width key; width: its value before; kept: its value after (K); count_key: the config key counting the
    shared experts (None when nothing else moves); count / new_count: its value before / after;
    shapes: {tensor: (shape before, shape written)} of every tensor padded; refusal: the first tensor no count key
    keeps exact (then nothing is padded)."""

    key: str
    width: int
    kept: int
    count_key: str | None = None
    count: int = 0
    new_count: int = 0
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    refusal: str | None = None

    @property
    def active(self) -> bool:
        return self.count_key is not None and self.refusal is None

    def config(self, cfg: dict[str, Any]) -> None:
        """The shared-expert count the padded width needs (config.json's dict, changed in place)."""
        if self.active:
            assert self.count_key is not None
            cfg[self.count_key] = self.new_count

    def pad(self, key: str, tensor: torch.Tensor) -> torch.Tensor | None:
        """``tensor`` (checkpoint tensor ``key``) with zero channels appended up to its written shape, or None when
        ``key`` is not padded."""
        if not self.active or key not in self.shapes:
            return None
        before, after = self.shapes[key]
        if tuple(tensor.shape) != before:
            raise ValueError(f"{key} has shape {list(tensor.shape)}, expected {list(before)} to pad")
        out = tensor.new_zeros(after)
        out[tuple(slice(0, n) for n in before)] = tensor
        return out

    def describe(self) -> dict[str, Any] | None:
        """The manifest's record of the padding (None when nothing is padded)."""
        if not self.active:
            return None
        modules = sorted({k.rsplit(".", 2)[0] for k in self.shapes})  # model.layers.1.mlp.shared_experts
        per_module = self.new_count * self.kept - self.count * self.width
        added = sum(math.prod(a) - math.prod(b) for b, a in self.shapes.values())
        return {
            "count_key": self.count_key,
            "count": self.count,
            "new_count": self.new_count,
            "width": self.count * self.width,
            "padded_width": self.new_count * self.kept,
            "zero_channels_per_module": per_module,
            "modules": modules,
            "params_added": added,
            "exact": "zero gate/up rows and zero down columns: the shared experts' output is unchanged",
        }

    def warning(self) -> str | None:
        d = self.describe()
        if d is None:
            return None
        return (
            f"uniform layout: {d['count_key']} {d['count']} -> {d['new_count']} so the shared experts keep their "
            f"{d['width']} channels at width {self.kept} ({d['zero_channels_per_module']} zero channels per module, "
            f"{d['params_added']} parameters added in {len(d['modules'])} modules; their output is unchanged)"
        )


def _int_keys(config: Any) -> dict[str, int]:
    return {
        k: v
        for k, v in config.to_dict().items()
        if isinstance(v, int) and not isinstance(v, bool) and v > 0 and hasattr(config, k)
    }


def _changed_dim(before: tuple[int, ...], after: tuple[int, ...] | None) -> int | None:
    """The one dimension that differs between two shapes of the same rank, else None."""
    if after is None or len(after) != len(before):
        return None
    dims = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
    return dims[0] if len(dims) == 1 else None


def shared_padding(config: Any, key: str, kept: int, routed_marker: str) -> SharedPadding:
    """The padding that keeps every tensor sized by config ``key`` besides the routed experts (tensor names
    containing ``routed_marker``) exact when ``key`` becomes ``kept`` (see the module docstring)."""
    width = int(getattr(config, key))
    plan = SharedPadding(key, width, kept)
    narrow = copy.deepcopy(config)
    setattr(narrow, key, kept)
    before, after = expected_shapes(config)[0], expected_shapes(narrow)[0]
    moved = [k for k, s in before.items() if after.get(k) != s and routed_marker not in f".{k}"]
    if not moved:
        return plan
    dims = {k: _changed_dim(before[k], after.get(k)) for k in moved}
    sizes = {before[k][d] for k, d in dims.items() if d is not None}
    if None in dims.values() or len(sizes) != 1 or next(iter(sizes)) % width:
        plan.refusal = moved[0]
        return plan
    shared = next(iter(sizes))
    n = shared // width
    new = math.ceil(shared / kept)
    cands = [k for k, v in _int_keys(config).items() if v == n and k != key]
    cands.sort(key=lambda k: "shared" not in k)
    for cand in cands[:MAX_TRIES]:
        trial = copy.deepcopy(narrow)
        setattr(trial, cand, new)
        try:
            got = expected_shapes(trial)[0]
        except Exception:  # a value this key cannot take (the model does not build): not the count key
            continue
        if set(got) != set(before):
            continue
        want = {k: tuple(new * kept if i == dims[k] else s for i, s in enumerate(before[k])) for k in moved}
        if all(got[k] == want[k] for k in moved) and all(got[k] == after[k] for k in before if k not in want):
            plan.count_key, plan.count, plan.new_count = cand, n, new
            plan.shapes = {k: (before[k], want[k]) for k in moved}
            return plan
    plan.refusal = moved[0]
    return plan


_PLANS: weakref.WeakKeyDictionary[Any, dict[tuple[str, int], SharedPadding]] = weakref.WeakKeyDictionary()


def checkpoint_padding(ckpt: Any, key: str, kept: int) -> SharedPadding:
    """``shared_padding`` for a checkpoint's (text) config and family, computed once per checkpoint and width."""
    plans = _PLANS.setdefault(ckpt, {})
    if (key, kept) not in plans:
        plans[(key, kept)] = shared_padding(ckpt.config, key, kept, f".{ckpt.family.experts}.")
    return plans[(key, kept)]
