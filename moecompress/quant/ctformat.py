"""The compressed-tensors ``quantization_config`` of a pack-quantized checkpoint, written and read back.

Every quantized module (hub name without ``.weight``) belongs to one config group keyed by (bits, group size).
Targets are anchored ``re:`` regexes: one per group for a uniform model (so transformers and vLLM see one scheme),
otherwise one per (layer, projection) listing the experts, so any per-layer / per-expert plan is described exactly.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

_EXPERT = re.compile(r"^(?P<pre>.*\.)(?P<e>\d+)\.(?P<proj>[^.]+)$")


def _weights_args(bits: int, group: int) -> dict[str, Any]:
    return {
        "num_bits": bits,
        "type": "int",
        "symmetric": True,
        "strategy": "group",
        "group_size": group,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
        "block_structure": None,
    }


def _targets(names: list[str], expert_block: str) -> list[str]:
    """Compact anchored regexes that match exactly ``names``."""
    by_prefix: dict[tuple[str, str], list[int]] = defaultdict(list)
    plain: list[str] = []
    for n in names:
        m = _EXPERT.match(n)
        if m and m.group("pre").endswith(f".{expert_block}."):
            by_prefix[(m.group("pre"), m.group("proj"))].append(int(m.group("e")))
        else:
            plain.append(n)
    out = []
    for (pre, proj), es in sorted(by_prefix.items()):
        alt = "|".join(str(e) for e in sorted(es))
        out.append(f"re:^{re.escape(pre)}(?:{alt})\\.{re.escape(proj)}$")
    out += [f"re:^{re.escape(n)}$" for n in sorted(plain)]
    return out


def quantization_config(
    modules: dict[str, tuple[int, int]],
    ignore: list[str],
    expert_block: str = "experts",
    extra_targets: dict[tuple[int, int], list[str]] | None = None,
) -> dict[str, Any]:
    """``modules``: hub module name -> (bits, group size), targeted one by one (compactly).
    ``extra_targets``: (bits, group size) -> ready-made targets (e.g. one generic regex for all routed experts of a
    uniform model), added to that group."""
    groups: dict[tuple[int, int], list[str]] = defaultdict(list)
    for name, key in modules.items():
        groups[key].append(name)
    for key in extra_targets or {}:
        groups.setdefault(key, [])
    config_groups = {}
    for i, (key, names) in enumerate(sorted(groups.items())):
        targets = list((extra_targets or {}).get(key, [])) + _targets(names, expert_block)
        config_groups[f"group_{i}"] = {
            "targets": targets,
            "weights": _weights_args(*key),
            "input_activations": None,
            "output_activations": None,
            "format": "pack-quantized",
        }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
    }


def scheme_of(qconfig: dict[str, Any], name: str) -> tuple[int, int] | None:
    """(bits, group size) of module ``name`` under a quantization_config, or None when it is not quantized."""
    for pat in qconfig.get("ignore", []):
        if _matches(pat, name):
            return None
    for group in qconfig.get("config_groups", {}).values():
        if any(_matches(t, name) for t in group.get("targets", [])):
            w = group["weights"]
            return int(w["num_bits"]), int(w.get("group_size") or 0)
    return None


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)
