"""`moecompress profile`: one layer-streamed forward pass that measures every routed expert."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from .. import __version__
from ..calibration.sets import TokenSet, calibration_set, check_seq_len
from ..core.checkpoint import Checkpoint, read_json_file
from ..core.errors import UserError
from ..core.progress import progress_bar
from ..core.stream import LayerStream
from ..core.writer import atomic_dir, check_output
from .stats import (
    LayerAccumulator,
    add_router_batch,
    finalize,
    observe_into,
    output_similarity,
    routed_forward,
    super_experts,
)


def load_tokenizer(path: Path) -> Any:
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as err:  # a tokenizer.json of the wrong structure raises KeyError, TypeError, tokenizers' own...
        first = (str(err).splitlines() or [""])[0][:200]
        raise UserError(
            f"cannot load the tokenizer from {path} ({type(err).__name__}: {first}): its tokenizer files are broken"
        ) from None


def min_tokens_rule(top_k: int, tokens: int, num_experts: int) -> int:
    """Fewer routed tokens than this and an expert's statistics are flagged as unreliable."""
    return max(8, int(0.05 * top_k * tokens / num_experts))


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
        """e.g. profile.layer(3, "reap") -> [E]; names as in stats.finalize plus "output_similarity"."""
        return self.tensors[f"layer{l}.{name}"]

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


def _observing_forward(experts: Any, router: Any, acc: LayerAccumulator, token_domain: torch.Tensor) -> Any:
    """A drop-in experts forward: the eager computation plus statistics of this batch into ``acc``."""

    def forward(hidden: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        logits = torch.nn.functional.linear(hidden.float(), router.weight.float())  # [T, E]
        if getattr(router, "bias", None) is not None:
            logits = logits + router.bias.float()
        add_router_batch(acc, logits, hidden)
        observe = observe_into(acc, w, token_domain)
        return routed_forward(experts.gate_up_proj, experts.down_proj, experts.act_fn, hidden, idx, w, observe)

    return forward


@torch.no_grad()
def collect(
    ckpt: Checkpoint,
    tokens: TokenSet,
    batch_size: int = 8,
    device: torch.device | None = None,
    sim_tokens: int = 256,
    streamed: bool = True,
) -> dict[int, dict[str, torch.Tensor]]:
    """Run the calibration pass; returns per-MoE-layer statistics (see stats.finalize)."""
    device = device or torch.device("cpu")
    doms = tokens.domain_names
    dom_id = torch.tensor([doms.index(d) for d in tokens.domains])  # [N]
    token_domain = dom_id[:, None].expand_as(tokens.input_ids)  # [N, S]
    fam = ckpt.family
    stream = LayerStream(ckpt, tokens.input_ids, batch_size=batch_size, device=device)
    moe = set(ckpt.moe_layers)
    results: dict[int, dict[str, torch.Tensor]] = {}
    n_layers = len(stream.decoder_layers)
    try:
        with progress_bar() as bar:
            task = bar.add_task("profile: embed", total=len(stream.batches) * (n_layers + 1))
            stream.capture()
            bar.advance(task, len(stream.batches))
            for l, layer in stream.layers():
                bar.update(task, description=f"profile: layer {l + 1}/{n_layers}")
                if l not in moe:
                    stream.forward_layer(layer)
                    bar.advance(task, len(stream.batches))
                    continue
                block = stream.moe_block(layer)
                experts = getattr(block, fam.experts)
                router = getattr(block, fam.router)
                acc = LayerAccumulator(
                    ckpt.num_experts, experts.down_proj.shape[-1], experts.down_proj.shape[1], len(doms), sim_tokens
                )
                for i in range(len(stream.cache)):
                    td = token_domain[i * batch_size : (i + 1) * batch_size].reshape(-1)

                    observed = _observing_forward(experts, router, acc, td)
                    experts.forward = observed
                    try:
                        stream.cache[i] = stream.run_layer(layer, i)
                    finally:
                        del experts.forward
                    bar.advance(task)
                stats = finalize(acc, ckpt.top_k)
                x = torch.cat(acc.sim_inputs).to(device)
                stats["output_similarity"] = output_similarity(
                    experts.gate_up_proj, experts.down_proj, experts.act_fn, x
                ).cpu()
                results[l] = stats
    finally:
        stream.close()
    return results


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
    t0 = time.time()
    ckpt = Checkpoint(model)
    out = check_output(output, ckpt.path, overwrite)
    check_seq_len(seq_len, ckpt.config)
    tok = load_tokenizer(ckpt.path)
    tokens = calibration_set(tok, calib, samples, seq_len, seed)
    stats = collect(ckpt, tokens, batch_size, device, sim_tokens)
    prof = build_profile(ckpt, tokens, stats, time.time() - t0, min_tokens)
    save_profile(prof, out, overwrite)
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


def json_safe(obj: Any, path: str = "") -> tuple[Any, list[str]]:
    """A copy of ``obj`` with every NaN/Inf float replaced by None, and the paths of those replaced."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None, [path or "value"]
    if isinstance(obj, dict):
        pairs = [(k, json_safe(v, f"{path}.{k}" if path else str(k))) for k, v in obj.items()]
        return {k: v for k, (v, _) in pairs}, [p for _, (_, ps) in pairs for p in ps]
    if isinstance(obj, list | tuple):
        items = [json_safe(v, f"{path}[{i}]") for i, v in enumerate(obj)]
        return [v for v, _ in items], [p for _, ps in items for p in ps]
    return obj, []


def save_profile(prof: Profile, output: str | Path, overwrite: bool = False) -> Path:
    with atomic_dir(output, overwrite=overwrite) as tmp:
        (tmp / "profile.json").write_text(json.dumps(json_safe(prof.meta)[0], indent=1, allow_nan=False) + "\n")
        save_file(prof.tensors, str(tmp / "profile.safetensors"))
    return Path(output)
