"""`moecompress.load(path)`: a transformers model that behaves exactly as the compressed weights say.

Uniform outputs (and plain HF folders) load through ``AutoModelForCausalLM.from_pretrained``; non-uniform
layouts recorded in ``moecompress.json`` (``"layout"``) dispatch to the loader registered for them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from .checkpoint import Checkpoint, load_manifest, resolve_model  # noqa: F401  (load_manifest: public here)
from .errors import UserError

# layout name in moecompress.json -> "module:function" taking (path, device, dtype) and returning the model
LOADERS: dict[str, str] = {
    "per-layer": "moecompress.prune.load:load_per_layer",  # expert pruning with per-layer expert counts
    "atomic_exact": "moecompress.atomic.load:load_exact_atomic",  # atomic pruning with per-expert widths
    "quantized": "moecompress.quant.load:load_quantized",  # compressed-tensors, any bit plan
    "budget_exact": "moecompress.budget.load:load_budget",  # budget plan: per-expert counts, widths and bits
}


def register_loader(layout: str, target: str) -> None:
    """Register ``"package.module:function"`` as the loader for outputs whose manifest says ``layout``."""
    LOADERS[layout] = target


def load_uniform(path: Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> PreTrainedModel:
    """A plain HF folder through transformers (eager experts: exact for any expert width); a multimodal wrapper
    through the class transformers maps it to (image-text-to-text)."""
    from transformers import AutoConfig

    from .derive import wrapper_auto_class

    auto = wrapper_auto_class(AutoConfig.from_pretrained(path, trust_remote_code=False)) or AutoModelForCausalLM
    try:
        model = auto.from_pretrained(
            path, trust_remote_code=False, experts_implementation="eager", dtype=dtype or torch.float32
        )
    except (OSError, ValueError, RuntimeError) as err:
        raise UserError(f"transformers cannot load {path}: {str(err).splitlines()[0]}") from None
    return model.to(device).eval()


def _resolve(target: str) -> Callable[..., PreTrainedModel]:
    mod, _, fn = target.partition(":")
    return getattr(importlib.import_module(mod), fn)


def load(
    path: str | Path | None = None, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> PreTrainedModel:
    """Load any moecompress output (or any supported HF MoE folder; the built-in model when None)."""
    p = resolve_model(path)
    layout = Checkpoint(p).layout  # validates config.json and moecompress.json before transformers sees them
    if layout == "uniform":
        return load_uniform(p, device, dtype)
    target = LOADERS.get(layout)
    if target is None:
        raise UserError(f"{p} has layout {layout!r}, which this moecompress version cannot load: upgrade moecompress")
    return _resolve(target)(p, device, dtype)
