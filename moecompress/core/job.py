"""What every command prepares once, before any compute: the checkpoint, the guarded output folder, the
calibration tokens (a reused profile's own windows when it names them), the profile, the device.

    job = Job.prepare(model, "out/q3", calib="mixed", samples=64, seq_len=256, device=torch.device("cpu"))
    tokens = job.tokens()            # the same windows for every stage of the job
    engine = job.engine("quantize")  # the layer-streamed loop over those tokens
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..calibration.sets import TokenSet, calibration_set, check_seq_len, load_tokenizer
from .checkpoint import Checkpoint
from .engine import Engine
from .errors import UserError
from .limits import memory_limit
from .writer import check_output


def check_fits_up_front(
    ckpt: Checkpoint, op: str, settings: dict[str, Any], *, samples: int, seq_len: int, batch_size: int,
    device: torch.device, profile_reused: bool = False,
) -> None:  # fmt: skip
    """Refuse ``op`` in one line (UserError) when its predicted peak host or GPU memory exceeds the machine or
    --max-memory. A model the cost model cannot size (an unusual config) is not refused."""
    from ..estimate import check_fits, predict, shape_of_config

    try:
        shape = shape_of_config(ckpt.config)
        settings.setdefault("profile_reused", profile_reused)
        est = predict(
            shape, op, samples=samples, seq_len=seq_len, batch_size=batch_size, device=device.type,
            max_memory=memory_limit(), memory=_device_memory(device), **settings,
        )  # fmt: skip
    except (UserError, ValueError, KeyError, TypeError, OSError):
        return
    check_fits(est, device.type, memory_limit())


def _device_memory(device: torch.device) -> int | None:
    """The memory an op sizes its chunks by without --max-memory: the GPU's, else this machine's RAM."""
    from .limits import gpu_memory_bytes, host_memory_bytes

    return (gpu_memory_bytes(device) if device.type == "cuda" else host_memory_bytes()) or None


@dataclass
class Job:
    ckpt: Checkpoint
    out: Path | None
    device: torch.device
    batch_size: int = 8
    overwrite: bool = False
    calib: str | Path = "mixed"
    samples: int = 64
    seq_len: int = 256
    seed: int = 0
    profile_dir: Path | None = None
    started: float = field(default_factory=time.time)
    profile_windows: bool = True  # tokens() reuses a profile's own windows (quantize: False, windows from --calib)
    _tokens: TokenSet | None = None
    _profile: Any = None

    @classmethod
    def prepare(
        cls,
        model: str | Path | Checkpoint | None,
        output: str | Path | None,
        *,
        calib: str | Path = "mixed",
        samples: int = 64,
        seq_len: int = 256,
        seed: int = 0,
        batch_size: int = 8,
        device: torch.device | None = None,
        overwrite: bool = False,
        profile_dir: str | Path | None = None,
        tokens: TokenSet | None = None,
        profile_windows: bool = True,
        op: str | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> Job:
        """Validate everything that can be validated without compute; the output is checked, not created.

        With ``op`` (profile, prune, atom, merge, quantize, compress) and its ``settings`` (method, refit, plan,
        hessian, stages, ... as ``estimate.predict`` takes them), refuse in one line when the predicted peak
        memory exceeds this machine's RAM, the GPU or --max-memory (``core.limits.memory_limit()``)."""
        started = time.time()
        ckpt = model if isinstance(model, Checkpoint) else Checkpoint(model)  # (opened already: not again)
        out = check_output(output, ckpt.path, overwrite) if output is not None else None
        stages = (settings or {}).get("stages") or ()
        if out is not None and (op == "quantize" or (op == "compress" and "quantize" in stages)):
            ckpt.check_layout("quantized")  # known before the pass: refuse up front, not after it
        if tokens is None and (profile_dir is None or not profile_windows):  # else the profile's windows
            check_seq_len(seq_len, ckpt.config)
        if op is not None:
            n, s = (tokens.input_ids.shape[0], tokens.input_ids.shape[1]) if tokens is not None else (samples, seq_len)
            check_fits_up_front(
                ckpt, op, dict(settings or {}), samples=n, seq_len=s, batch_size=batch_size,
                device=device or torch.device("cpu"), profile_reused=profile_dir is not None,
            )  # fmt: skip
        return cls(
            ckpt, out, device or torch.device("cpu"), batch_size, overwrite, calib, samples, seq_len, seed,
            Path(profile_dir) if profile_dir is not None else None, started, profile_windows, tokens,
        )  # fmt: skip

    def profile(self) -> Any:
        """The reused profile (loaded once and checked against this model), or None."""
        if self._profile is None and self.profile_dir is not None:
            from ..profile.files import Profile

            self._profile = Profile.load(self.profile_dir)
            self._profile.check_model(self.ckpt)
        return self._profile

    def tokens(self) -> TokenSet:
        """The calibration windows: given, a reused profile's own, or drawn from --calib (seeded)."""
        if self._tokens is None:
            prof = self.profile() if self.profile_windows else None
            cal = (prof.meta.get("calibration") or {}) if prof is not None else {}
            if cal.get("name"):
                self._tokens = calibration_set(
                    load_tokenizer(self.ckpt.path), cal["name"], cal["samples"], cal["seq_len"], cal.get("seed") or 0
                )
            else:
                check_seq_len(self.seq_len, self.ckpt.config)
                self._tokens = calibration_set(
                    load_tokenizer(self.ckpt.path), self.calib, self.samples, self.seq_len, self.seed
                )
        return self._tokens

    def engine(self, label: str, tokens: TokenSet | None = None) -> Engine:
        """The layer-streamed loop over the job's tokens (or ``tokens``) on the job's device."""
        t = tokens if tokens is not None else self.tokens()
        return Engine(self.ckpt, t.input_ids, self.batch_size, self.device, label)

    @property
    def elapsed(self) -> float:
        return time.time() - self.started
