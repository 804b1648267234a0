"""`moecompress compress`: every stage of a recipe in ONE layer-streamed pass, one checkpoint, one manifest.

For each decoder layer l (core/engine.py): the MoE block's inputs are captured once; each stage in recipe order
changes the block (experts removed or merged, channels removed, weights quantized); the compressed layer runs
forward and its outputs are layer l + 1's inputs. So every stage of layer l + 1 is calibrated on the compressed
layers 0..l (sequential calibration, as GPTQ does), where running the single commands one after the other
calibrates the first command on the original model. The profile the stages need (super experts, profile
scores) comes from ``--profile`` or from one profiling pass before the compression pass.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..core.engine import Transform
from ..core.errors import UserError
from ..core.job import Job
from ..core.manifest import Manifest
from ..core.output import Output
from ..merge.cluster import MergeTargetError
from ..prune.order import NotEnoughRemovable
from .recipe import Stage

# op -> builder(job, options, profile) -> Transform. Each operation package provides its transform.
Builder = Callable[[Job, dict[str, Any], Any], Transform]


def _prune(job: Job, opts: dict[str, Any], prof: Any) -> Transform:
    from ..prune.transform import transform_for_recipe

    return transform_for_recipe(job, opts, prof)


def _merge(job: Job, opts: dict[str, Any], prof: Any) -> Transform:
    from ..merge.transform import transform_for_recipe

    return transform_for_recipe(job, opts, prof)


def _atom(job: Job, opts: dict[str, Any], prof: Any) -> Transform:
    from ..atomic.run import transform_for_recipe

    return transform_for_recipe(job, opts, prof)


def _quantize(job: Job, opts: dict[str, Any], prof: Any) -> Transform:
    from ..quant.transform import transform_for_recipe

    return transform_for_recipe(job, opts, prof)


BUILDERS: dict[str, Builder] = {"prune": _prune, "merge": _merge, "atom": _atom, "quantize": _quantize}


def reads_output_similarity(stages: list[Stage]) -> bool:
    """Whether a stage reads the profile's output similarity: only a merge stage clustering by it (the merge
    command's default). Without one, compress's own profile pass skips measuring it, as prune's does."""
    from ..merge.options import MergeOptions

    return any(s.op == "merge" and MergeOptions(**s.options).similarity == "output" for s in stages)


def _profile(job: Job, stages: list[Stage]) -> tuple[Any, bool]:
    """The reused --profile, or a profile made now in a pass of its own (returned with True: save it). The pass
    measures output similarity only when a stage reads it (it evaluates every expert on 256 tokens: as much expert
    compute as the routed forward at E128); otherwise the saved profile has none, like prune's own, and
    ``merge --profile`` refuses it in one line. Everything else is bit for bit a standalone profile's."""
    prof = job.profile()
    if prof is not None:
        return prof, False
    from ..profile.run import build_profile, collect

    tokens = job.tokens()
    if reads_output_similarity(stages):
        stats = collect(job.ckpt, tokens, job.batch_size, job.device)
    else:
        stats = collect(job.ckpt, tokens, job.batch_size, job.device, sim_tokens=0)
    return build_profile(job.ckpt, tokens, stats, job.elapsed), True


def new_manifest(job: Job, command: str, profile_dir: str | Path | None) -> tuple[Manifest, str]:
    """The one-pass output's manifest (common fields; stages are added as they are written) and where the report
    finds the profile the stages used: the --profile run, or the one saved into the output (``keep_profile``)."""
    ckpt = job.ckpt
    manifest = Manifest(
        command=command, layout="uniform", load_with="transformers", source_model=str(ckpt.path),
        source_fingerprint=ckpt.fingerprint, calibration=job.tokens().describe(), params_before=ckpt.num_params,
        bytes_before=ckpt.bytes_on_disk,
    )  # fmt: skip
    return manifest, str(Path(profile_dir).resolve()) if profile_dir is not None else "profile"


def keep_profile(out: Output, prof: Any, made: bool, profile_dir: str | Path | None) -> list[Path]:
    """Save a profile this job made into the output (``profile/``); the folders the report reads it from."""
    if made:
        from ..profile.run import save_profile

        assert out.tmp is not None
        save_profile(prof, out.tmp / "profile")
    return [Path(profile_dir)] if profile_dir is not None else []


def compress_model(
    model: str | Path | None,
    output: str | Path,
    stages: list[Stage],
    calib: str | Path = "mixed",
    samples: int = 64,
    seq_len: int = 256,
    seed: int = 0,
    batch_size: int = 8,
    device: torch.device | None = None,
    overwrite: bool = False,
    profile_dir: str | Path | None = None,
) -> Manifest:
    """Run ``stages`` in one pass and write OUTPUT (HF folder + moecompress.json + report.html)."""
    job = Job.prepare(
        model, output, calib=calib, samples=samples, seq_len=seq_len, seed=seed, batch_size=batch_size,
        device=device, overwrite=overwrite, profile_dir=profile_dir, op="compress",
        settings={"stages": [s.op for s in stages]},
    )  # fmt: skip
    ckpt = job.ckpt
    prof, made = _profile(job, stages)
    transforms = [BUILDERS[s.op](job, dict(s.options), prof) for s in stages]
    cfg = json.loads((ckpt.path / "config.json").read_text())
    manifest, profile_ref = new_manifest(job, "compress", profile_dir)
    assert job.out is not None
    with Output(job.out, job.overwrite) as out:
        out.add_globals(ckpt, transforms)
        try:
            job.engine("compress").run(transforms, emit=out.add_layer)
        except (NotEnoughRemovable, MergeTargetError) as err:  # a stage that cannot run on what the last one left
            raise UserError(f"compress: {err}; change the recipe's ratios") from None
        for s, t in zip(stages, transforms, strict=True):
            t.config(cfg)
            section = manifest.add(s.op, {"recipe": s.options, **t.section(), "profile": profile_ref})
            manifest.warnings += [str(w) for w in section.pop("warnings", []) or []]
            layout = getattr(t, "layout", None)
            if layout is not None:
                manifest.layout = layout
                manifest.load_with = "transformers" if layout == "uniform" else "moecompress.load"
        reuse = keep_profile(out, prof, made, profile_dir)
        out.finish(ckpt, cfg, manifest, report_inputs=reuse, elapsed=job.elapsed)
    return manifest
