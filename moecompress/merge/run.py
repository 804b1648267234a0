"""`moecompress merge`: cluster each MoE layer's experts and merge every cluster into ONE expert.

The preamble (``Job``), one engine pass with ``MergeTransform`` (merge/transform.py: per layer, merge/layer.py's
``merge_layer``), the ``Output`` writer fed layer by layer, and a one-stage ``Manifest``. With ``sequential`` (the
default) every layer is calibrated on the already-merged earlier layers. The output is a normal HF folder with
fewer experts per layer (uniform count) and moecompress.json.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..calibration.sets import TokenSet
from ..core.checkpoint import DTYPE_BYTES, Checkpoint
from ..core.errors import UserError
from ..core.job import Job
from ..core.manifest import Manifest
from ..core.output import Output
from .cluster import MergeTargetError, check_merge_target
from .cluster import n_clusters_for as n_clusters_for
from .layer import merge_layer as merge_layer
from .layer import routing_frequency as routing_frequency
from .options import METHODS as METHODS
from .options import ROUTER_REBUILDS as ROUTER_REBUILDS
from .options import SIMILARITIES as SIMILARITIES
from .options import MergeOptions
from .transform import MergeTransform, protected_experts

__all__ = ["DTYPE_BYTES", "MergeOptions", "MergeTransform", "expected_bytes", "expected_size", "merge_model"]

# what to change, in the command's flags, for each kind of MergeTargetError
_FIX = {
    "larger": "use a larger --ratio",
    "smaller": "use a smaller --ratio",
    "unprotect": "use a smaller --ratio or --no-protect",
    "other": "choose another --ratio",
}


def user_error(err: MergeTargetError) -> UserError:
    """A merge target refused by the math, in the command's words."""
    return UserError(f"cannot merge: {err}; {_FIX.get(err.fix, 'choose another --ratio')}")


def expected_size(ckpt: Checkpoint, n_clusters: int, unit: str = "bytes") -> int:
    """Tensor bytes (or parameters) of the checkpoint after merging every MoE layer to ``n_clusters`` experts.

    Safetensors headers are excluded: the bytes equal the output index's ``metadata.total_size``.
    """
    E = ckpt.num_experts
    patterns = [ckpt.family.routed_key_pattern(l) for l in ckpt.moe_layers]
    total = 0
    for key, meta in ckpt.tensor_info().items():
        n = 1
        for s in meta["shape"]:
            n *= s
        size = n * (DTYPE_BYTES[meta["dtype"]] if unit == "bytes" else 1)
        if any(p.match(key) for p in patterns):
            hub = re.search(r"\.experts\.(\d+)\.", key)
            if hub:  # one expert's projection: experts 0..K-1 remain
                size = size if int(hub.group(1)) < n_clusters else 0
            else:  # router rows / biases / fused expert tensors: leading dimension E
                size = size // E * n_clusters
        total += size
    return total


def expected_bytes(ckpt: Checkpoint, n_clusters: int) -> int:
    """Tensor bytes after merging (see ``expected_size``)."""
    return expected_size(ckpt, n_clusters, "bytes")


def merge_model(
    model: str | Path | None,
    output: str | Path,
    opts: MergeOptions,
    profile_dir: str | Path | None = None,
    calib: str | Path = "mixed",
    samples: int = 64,
    seq_len: int = 256,
    batch_size: int = 8,
    device: torch.device | None = None,
    overwrite: bool = False,
    tokens: TokenSet | None = None,
) -> Manifest:
    """Merge a checkpoint's experts and write OUTPUT (HF folder + moecompress.json). Returns the manifest.

    ``tokens`` replaces ``calib``/``samples``/``seq_len`` when given (API use, tests). Unlike prune, merge draws its
    calibration windows from ``calib`` (seeded by ``opts.seed``) even with a profile: the profile gives statistics.
    """
    opts.validate()
    job = Job.prepare(
        model, output, calib=calib, samples=samples, seq_len=seq_len, seed=opts.seed, batch_size=batch_size,
        device=device, overwrite=overwrite, profile_dir=profile_dir, tokens=tokens, profile_windows=False,
        op="merge", settings={"sim_tokens": opts.sim_tokens},
    )  # fmt: skip
    profile, ckpt = job.profile(), job.ckpt
    if profile is not None and profile.moe_layers:  # a profile without the similarity asked for: refused up front
        profile.layer(profile.moe_layers[0], f"{opts.similarity}_similarity")  # (prune's own has no output similarity)
    ckpt.family.check_routing(ckpt.config, "merging", True, True, "prune with --method frequency instead")
    protected = protected_experts(ckpt.moe_layers, profile, opts.protect_super)
    K = n_clusters_for(ckpt.num_experts, opts.ratio)
    try:
        n_prot = max((len(v) for v in protected.values()), default=0)
        check_merge_target(ckpt.num_experts, K, ckpt.top_k, n_prot, ckpt.family.n_group(ckpt.config))
    except MergeTargetError as err:
        raise user_error(err) from None
    tokens = job.tokens()

    t = MergeTransform(opts, profile, protected)
    manifest = Manifest(
        command="merge", layout="uniform", load_with="transformers", source_model=str(ckpt.path),
        source_fingerprint=ckpt.fingerprint, calibration=tokens.describe(), params_before=ckpt.num_params,
        bytes_before=ckpt.bytes_on_disk,
    )  # fmt: skip
    if profile is None and opts.protect_super:
        manifest.warnings.append("no --profile: super experts are unknown, so none is protected from merging")
    cfg = json.loads((ckpt.path / "config.json").read_text())
    assert job.out is not None
    with Output(job.out, overwrite) as out:
        out.add_globals(ckpt, [t])
        try:
            job.engine("merge", tokens).run([t], emit=out.add_layer)
        except MergeTargetError as err:
            raise user_error(err) from None
        t.config(cfg)
        section = t.section()
        manifest.warnings += section.pop("warnings")
        section["profile"] = str(Path(profile_dir).resolve()) if profile_dir is not None else None
        section["calibration_fingerprint"] = tokens.fingerprint
        section["expected_tensor_bytes_after"] = expected_bytes(ckpt, K)
        manifest.add("merge", section)
        report_inputs = [Path(profile_dir)] if profile_dir is not None else []
        out.finish(ckpt, cfg, manifest, report_inputs=report_inputs, elapsed=job.elapsed)
    return manifest
