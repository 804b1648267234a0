"""A profile run folder (profile.json + profile.safetensors), read and checked: what the other commands reuse."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..core.checkpoint import Checkpoint, read_json_file
from ..core.errors import UserError


@dataclass
class Profile:
    """A profile run folder: profile.json (summary) + profile.safetensors (per-layer tensors)."""

    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @classmethod
    def load(cls, run_dir: str | Path) -> Profile:
        d = Path(run_dir)
        if not (d / "profile.json").exists():
            raise UserError(f"{d} has no profile.json: give a folder written by `moecompress profile`")
        meta = read_json_file(d / "profile.json", "profile (JSON)", 256 * 1024**2)
        if not isinstance(meta, dict):
            raise UserError(f"{d / 'profile.json'} holds a JSON {type(meta).__name__}: it is not a moecompress profile")
        _check_profile_meta(meta, d / "profile.json")
        try:
            tensors = load_file(str(d / "profile.safetensors"))
        except Exception as err:  # safetensors raises its own error type for a corrupt file
            first = (str(err).splitlines() or [""])[0][:200]
            raise UserError(f"cannot read {d / 'profile.safetensors'} ({first}): profile the model again") from None
        return cls(meta, tensors)

    def layer(self, l: int, name: str) -> torch.Tensor:
        """e.g. profile.layer(3, "reap") -> [E]; names as in stats.finalize plus "output_similarity" (which the
        profile ``moecompress prune``, or ``compress`` without a merge stage, makes for itself does not measure: a
        UserError here)."""
        key = f"layer{l}.{name}"
        if key not in self.tensors and name == "output_similarity" and f"layer{l}.tokens" in self.tensors:
            raise UserError(
                "this profile has no output similarity (the profile `moecompress prune`, or `compress` without a "
                "merge stage, writes for itself does not measure it): give a profile from `moecompress profile`, "
                "or none"
            )
        return self.tensors[key]

    @property
    def moe_layers(self) -> list[int]:
        return list(self.meta["moe_layers"])

    @property
    def super_experts(self) -> list[tuple[int, int]]:
        return [tuple(x) for x in self.meta.get("super_experts") or []]  # type: ignore[misc]

    def check_model(self, ckpt: Checkpoint) -> None:
        if self.meta.get("model_fingerprint") != ckpt.fingerprint:
            raise UserError(
                f"the profile was made on another model (fingerprint {str(self.meta.get('model_fingerprint'))[:12]} "
                f"!= {ckpt.fingerprint[:12]}): profile this model again"
            )


def _check_profile_meta(meta: dict[str, Any], path: Path) -> None:
    """The profile.json fields the commands read have the types `moecompress profile` writes."""

    def whole(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**31

    checks = {
        "moe_layers": lambda v: isinstance(v, list) and all(whole(x) for x in v),
        "super_experts": lambda v: (
            isinstance(v, list) and all(isinstance(x, list) and len(x) == 2 and all(whole(y) for y in x) for x in v)
        ),
        "num_experts": lambda v: whole(v) and v > 0,
        "top_k": lambda v: whole(v) and v > 0,
        "experts": lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v),
    }
    for key, ok in checks.items():
        if key in meta and not ok(meta[key]):
            shown = repr(meta[key])[:60]
            raise UserError(f"{path} field {key} is {shown}, not what `moecompress profile` writes: profile again")
    if "moe_layers" not in meta:
        raise UserError(f"{path} has no moe_layers: it is not a moecompress profile")
