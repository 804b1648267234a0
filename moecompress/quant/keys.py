"""Names of the quantized routed-expert modules a family's quantized output holds.

Per-expert hub keys (``<block>.experts.<e>.gate_proj.weight``) for every family with per-expert keys on disk. Llama-4
keeps its experts fused on disk (``feed_forward.experts.gate_up_proj [E, H, 2I]``), but when transformers loads a
compressed-tensors checkpoint it replaces ``Llama4TextExperts`` by ``SequentialLlama4TextExperts``: one
``Llama4TextMLP`` per expert (``experts.<e>.gate_proj / up_proj / down_proj``, transformers/quantizers/base.py,
MODULES_TO_PATCH_FOR_QUANTIZATION), so a quantized Llama-4 is written per expert under those names. Other families
fused on disk have no such module (their refusal stays in ``Family.expert_key``).
"""

from __future__ import annotations

from typing import Any

SEQUENTIAL = ("gate_proj", "up_proj", "down_proj")  # Llama4TextMLP's projections


def sequential(fam: Any) -> bool:
    """Llama-4 (experts fused on disk, router-scaled inputs): quantized per expert as SequentialLlama4TextExperts."""
    return bool(fam.fused_disk and fam.scaled_input)


def expert_names(fam: Any) -> tuple[str, str, str]:
    """(gate, up, down) projection names of one quantized expert module."""
    return SEQUENTIAL if sequential(fam) else tuple(fam.expert_names)


def expert_key(fam: Any, layer: int, expert: int, proj: int) -> str:
    """Checkpoint key of one routed projection's weight in a quantized output (proj: 0 gate, 1 up, 2 down)."""
    if sequential(fam):
        return f"{fam.block_prefix(layer)}{fam.experts}.{expert}.{SEQUENTIAL[proj]}.weight"
    return fam.expert_key(layer, expert, proj)


def fused_keys(fam: Any, layer: int) -> list[str]:
    """The fused disk tensors a sequential family's quantized experts replace (none for per-expert families)."""
    if not sequential(fam):
        return []
    return [fam.fused_key(layer, n.rpartition(".")[2]) for n in fam.fused_names]


def expert_info(ck: Any, layer: int, proj: int) -> tuple[tuple[int, int], str]:
    """((rows, cols), safetensors dtype) of one routed projection's weight: its header, or for a sequential family
    the fused tensor's (Llama-4: gate_up_proj [E, H, 2I], down_proj [E, I, H] on disk)."""
    info = ck.tensor_info()
    fam = ck.family
    if not sequential(fam):
        v = info[fam.expert_key(layer, 0, proj)]
        return (int(v["shape"][0]), int(v["shape"][1])), v["dtype"]
    gu, dn = (info[k] for k in fused_keys(fam, layer))
    H = int(ck.config.hidden_size)
    E, a, b = gu["shape"]
    I = (b if a == H else a) // 2
    return ((I, H) if proj < 2 else (H, I)), (gu if proj < 2 else dn)["dtype"]
