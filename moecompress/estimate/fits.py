"""Does a prediction fit this machine (or --max-memory)? One line saying what to change when it does not."""

from __future__ import annotations

from ..core.errors import UserError
from ..core.limits import format_size, gpu_memory_bytes, host_memory_bytes, memory_limit
from .model import CHUNKED, Estimate

_ADVICE = {  # the term that dominates the host peak -> (what shrinks it, the variants that have that option)
    "acts": ("fewer --samples or a shorter --seq-len (the activation cache: samples x seq-len x hidden fp32)", None),
    "hessians": ("--max-memory (Hessians held a chunk of experts at a time)", ("quantize-gptq", "quantize-lp")),
    "G": ("--hessian diag (G_e as its diagonal)", ("atom",)),
    "err": ("a smaller --error-tokens", ("prune", "prune-refit")),
    "sim": ("a smaller --sim-tokens", ("profile", "merge")),
    "cache": ("fewer --samples (the refit caches the routed expert outputs)", ("prune-refit",)),
    "downs": ("--refit none (the default down refit holds the kept down projections in float32)", ("prune",)),
    "hidden": ("a smaller --error-tokens (the down refit reads their expert activations)", ("prune",)),
    "codes": ("--plan uniform (the LP plan holds codes at every candidate width)", ("quantize-lp",)),
    "align": ("--no-align", ("merge",)),
}


def limits_for(device: str, max_memory: int | None = None) -> tuple[int, int]:
    """(host bytes, GPU bytes) an op may use: this machine's RAM and the device's memory, each capped by
    --max-memory (``max_memory``, else the process-wide ``memory_limit()``); GPU 0 on a CPU device."""
    cap = max_memory if max_memory is not None else memory_limit()
    host = host_memory_bytes() or (cap or 0)
    gpu = gpu_memory_bytes(device) if device.startswith("cuda") else 0
    if cap is not None:
        host = min(host, cap)
        gpu = min(gpu, cap) if gpu else 0
    return host, gpu


def verdict(est: Estimate, host_limit: int, gpu_limit: int, device: str) -> str | None:
    """None when it fits, else what does not fit (a phrase)."""
    if host_limit and est.host_bytes > host_limit:
        return f"{format_size(est.host_bytes)} of host memory (limit {format_size(host_limit)})"
    if device.startswith("cuda") and gpu_limit and est.gpu_bytes > gpu_limit:
        return f"{format_size(est.gpu_bytes)} of GPU memory (limit {format_size(gpu_limit)})"
    return None


def advice(est: Estimate, max_memory_given: bool) -> str:
    terms = {n: v for n, v in est.terms.items() if n != "const"}
    ranked = sorted(terms, key=lambda n: -terms[n])
    tips = []
    for n in ranked[:2]:
        tip, variants = _ADVICE.get(n, (None, None))
        if tip and (variants is None or est.variant in variants) and not (max_memory_given and n in CHUNKED):
            tips.append(tip)
    tips += ["a machine with more memory", "torchrun --nproc-per-node N to split the work"]
    return ", ".join(dict.fromkeys(tips))


def check_fits(est: Estimate, device: str = "cpu", max_memory: int | None = None) -> None:
    """Raise a one-line UserError when the predicted peak exceeds host RAM, the GPU or --max-memory."""
    host, gpu = limits_for(device, max_memory)
    over = verdict(est, host, gpu, device)
    if over is None:
        return
    given = max_memory is not None or memory_limit() is not None
    raise UserError(
        f"{est.op} is predicted to need {over}, so it would not finish: use {advice(est, given)}; "
        "`moecompress plan` shows the prediction per operation"
    )
