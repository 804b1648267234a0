"""NF4 for fused 3-D experts through bitsandbytes (not reimplemented).

Loading a model through transformers with a bitsandbytes config quantizes only ``nn.Linear`` layers and leaves the
fused ``[E, R, C]`` expert parameters in full precision, so expert slices are quantized here one by one with
``bitsandbytes.functional.quantize_4bit`` and their serializable quant state is kept next to the packed bytes.
"""

from __future__ import annotations

import torch


def _bnb():
    import bitsandbytes.functional as bnbf

    return bnbf


def nf4_quantize_experts(w: torch.Tensor, blocksize: int = 64) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """Quantize each expert slice of ``w [E, R, C]`` to NF4.

    Returns per expert ``(packed uint8 [R*C/2, 1], state)`` where ``state`` is bitsandbytes'
    ``QuantState.as_dict(packed=True)`` (tensors only, safetensors-ready).
    """
    bnbf = _bnb()
    out = []
    for e in range(w.shape[0]):
        packed, state = bnbf.quantize_4bit(w[e].contiguous(), blocksize=blocksize, quant_type="nf4")
        out.append((packed, state.as_dict(packed=True)))
    return out


def nf4_dequantize_experts(
    parts: list[tuple[torch.Tensor, dict[str, torch.Tensor]]], device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Inverse of :func:`nf4_quantize_experts`: list of ``(packed, state)`` -> ``[E, R, C]``."""
    bnbf = _bnb()
    slices = []
    for packed, state in parts:
        qs = bnbf.QuantState.from_dict(state, device=torch.device(device))
        slices.append(bnbf.dequantize_4bit(packed.to(device), qs))
    return torch.stack(slices)


def nf4_nbytes(parts: list[tuple[torch.Tensor, dict[str, torch.Tensor]]]) -> int:
    """Bytes of the packed weights plus their quant states."""
    total = 0
    for packed, state in parts:
        total += packed.numel() * packed.element_size()
        total += sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
    return total
