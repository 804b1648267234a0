"""`moecompress profile`: one layer-streamed forward pass that measures every routed expert."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..calibration.sets import TokenSet
from ..core.checkpoint import Checkpoint
from ..core.engine import Engine
from ..core.job import Job
from ..core.manifest import json_safe
from ..core.writer import atomic_dir
from ..version import __version__
from .files import Profile
from .stats import (
    super_experts,
)
from .transform import ProfileTransform


def min_tokens_rule(top_k: int, tokens: int, num_experts: int) -> int:
    """Fewer routed tokens than this and an expert's statistics are flagged as unreliable."""
    return max(8, int(0.05 * top_k * tokens / num_experts))


@torch.no_grad()
def collect(
    ckpt: Checkpoint,
    tokens: TokenSet,
    batch_size: int = 8,
    device: torch.device | None = None,
    sim_tokens: int = 256,
) -> dict[int, dict[str, torch.Tensor]]:
    """Run the calibration pass; returns per-MoE-layer statistics (see stats.finalize)."""
    t = ProfileTransform(ckpt.num_experts, ckpt.top_k, tokens.domain_names, tokens.domains, sim_tokens)
    Engine(ckpt, tokens.input_ids, batch_size, device, "profile").run([t])
    return t.results


def run_profile(
    model: str | Path | None,
    output: str | Path,
    calib: str = "mixed",
    samples: int = 64,
    seq_len: int = 256,
    seed: int = 0,
    batch_size: int = 8,
    device: torch.device | None = None,
    sim_tokens: int = 256,
    overwrite: bool = False,
    min_tokens: int | None = None,
) -> Profile:
    """Profile a model on calibration data and write OUTPUT/profile.json + profile.safetensors."""
    job = Job.prepare(
        model, output, calib=calib, samples=samples, seq_len=seq_len, seed=seed, batch_size=batch_size,
        device=device, overwrite=overwrite, op="profile", settings={"sim_tokens": sim_tokens},
    )  # fmt: skip
    tokens = job.tokens()
    stats = collect(job.ckpt, tokens, batch_size, job.device, sim_tokens)
    prof = build_profile(job.ckpt, tokens, stats, job.elapsed, min_tokens)
    assert job.out is not None
    save_profile(prof, job.out, overwrite)
    return prof


def build_profile(
    ckpt: Checkpoint,
    tokens: TokenSet,
    stats: dict[int, dict[str, torch.Tensor]],
    elapsed: float,
    min_tokens: int | None = None,
) -> Profile:
    T = tokens.num_tokens
    k = ckpt.top_k
    E = ckpt.num_experts
    low = min_tokens if min_tokens is not None else min_tokens_rule(k, T, E)
    experts = []
    max_abs: dict[tuple[int, int], float] = {}
    for l, s in stats.items():
        for e in range(E):
            max_abs[(l, e)] = float(s["max_abs_out"][e])
    supers, rule = super_experts(max_abs, ckpt.config.num_hidden_layers)
    warnings = []
    for l, s in stats.items():
        for e in range(E):
            n = int(s["tokens"][e])
            flagged = n < low
            experts.append(
                {
                    "layer": l,
                    "expert": e,
                    "tokens": n,
                    "frequency": float(s["frequency"][e]),
                    "routing_mass": float(s["routing_mass"][e]),
                    "reap": float(s["reap"][e]),
                    "max_abs_out": float(s["max_abs_out"][e]),
                    "max_abs_channel": int(s["max_abs_channel"][e]),
                    "super": (l, e) in supers,
                    "low_tokens": flagged,
                }
            )
            if flagged:
                warnings.append(
                    f"layer {l} expert {e}: only {n} routed tokens (< {low}); its statistics are unreliable"
                )
    doms = tokens.domain_names
    domains = None
    if len(doms) > 1:
        domains = {
            d: {
                "windows": tokens.domains.count(d),
                "counts": [[int(s["domain_counts"][i, e]) for e in range(E)] for s in stats.values()],
            }
            for i, d in enumerate(doms)
        }
    meta = {
        "model": str(ckpt.path),
        "model_fingerprint": ckpt.fingerprint,
        "family": ckpt.family.name,
        "model_type": ckpt.config.model_type,
        "num_experts": E,
        "top_k": k,
        "tokens": T,
        "moe_layers": sorted(stats),
        "num_hidden_layers": ckpt.config.num_hidden_layers,
        "experts": experts,
        "super_experts": [list(x) for x in supers],
        "super_rule": rule,
        "min_tokens": low,
        "domains": domains,
        "calibration": tokens.describe(),
        "tool_version": __version__,
        "elapsed_s": round(elapsed, 2),
        "warnings": warnings,
    }
    meta, nonfinite = json_safe(meta)
    if nonfinite:
        more = f" and {len(nonfinite) - 5} more" if len(nonfinite) > 5 else ""
        warnings.append(
            f"{len(nonfinite)} statistics are NaN or Inf ({', '.join(nonfinite[:5])}{more}): written as null in "
            "profile.json (JSON has no NaN); profile.safetensors keeps the raw values"
        )
    bad = [f"tensor {k} holds {n} NaN and {i} Inf values" for k, (n, i) in ckpt.nonfinite.items()]
    meta["warnings"] = bad + warnings
    tensors = {f"layer{l}.{name}": t.contiguous() for l, s in stats.items() for name, t in s.items()}
    return Profile(meta, tensors)


def save_profile(prof: Profile, output: str | Path, overwrite: bool = False) -> Path:
    with atomic_dir(output, overwrite=overwrite) as tmp:
        (tmp / "profile.json").write_text(json.dumps(json_safe(prof.meta)[0], indent=1, allow_nan=False) + "\n")
        save_file(prof.tensors, str(tmp / "profile.safetensors"))
    return Path(output)
