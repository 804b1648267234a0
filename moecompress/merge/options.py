"""Everything that decides a merge: one options dataclass, checked before any work (recorded in moecompress.json)."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import UserError
from .choose import KINDS

METHODS = ("subspace", "average")
ROUTER_REBUILDS = ("fit", "average")
SIMILARITIES = ("output", "router")


@dataclass(frozen=True)
class MergeOptions:
    """Everything that decides a merge (recorded in moecompress.json)."""

    ratio: float
    method: str = "subspace"
    rank: int | None = None
    rank_fraction: float | None = None
    router: str = "fit"
    similarity: str = "output"
    protect_super: bool = True
    align: bool | None = None  # neuron alignment before merging; None: on for subspace, off for average (HC-SMoE)
    align_tokens: int = 2048
    align_block: int = 1024  # neurons matched exactly in one block (merge/align.py); wider experts: blocks
    refit: bool | None = None  # least-squares refit of merged down projections; None: on for subspace only
    sim_tokens: int = 512
    fit_tokens: int = 8192
    kl_steps: int = 20
    seed: int = 0
    choose: bool = True  # measure keep/subspace/average (+refit) per cluster and keep the best (merge/choose.py)
    candidates: tuple[str, ...] = KINDS
    eval_tokens: int = 4096  # choose: held-out calibration tokens the candidates are measured on
    min_gain_se: float = 2.0  # choose: a candidate (or clustering) replaces the pruning-like one only when it lowers
    # the held-out error by more than this many standard errors (paired over the measure tokens)
    final_refit: bool = True  # choose: refit the chosen down projections on every calibration token (fit + held-out)
    sequential: bool = True  # calibrate each layer on the already-merged earlier layers

    @property
    def aligned(self) -> bool:
        return self.method == "subspace" if self.align is None else self.align

    @property
    def refitted(self) -> bool:
        return self.method == "subspace" if self.refit is None else self.refit

    def validate(self) -> None:
        if not 0.0 < self.ratio < 1.0:
            raise UserError(f"--ratio {self.ratio} must be between 0 and 1 (the fraction of experts merged away)")
        if self.method not in METHODS:
            raise UserError(f"--method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.router not in ROUTER_REBUILDS:
            raise UserError(f"--router {self.router!r} is not one of {', '.join(ROUTER_REBUILDS)}")
        if self.similarity not in SIMILARITIES:
            raise UserError(f"--similarity {self.similarity!r} is not one of {', '.join(SIMILARITIES)}")
        if self.rank is not None and self.rank_fraction is not None:
            raise UserError("give either --rank or --rank-fraction, not both")
        if self.rank is not None and self.rank < 1:
            raise UserError(f"--rank {self.rank} must be at least 1")
        if self.rank_fraction is not None and not 0.0 < self.rank_fraction <= 1.0:
            raise UserError(f"--rank-fraction {self.rank_fraction} must be in (0, 1]")
        if self.method == "average" and (self.rank is not None or self.rank_fraction is not None):
            raise UserError("--rank/--rank-fraction apply to --method subspace only")
        if self.sim_tokens < 2 or self.fit_tokens < 1:
            raise UserError("--sim-tokens must be at least 2 and --fit-tokens at least 1")
        bad = [k for k in self.candidates if k not in KINDS]
        if bad or not self.candidates:
            raise UserError(f"merge candidates {bad or '(none)'} are not among {', '.join(KINDS)}")
        if self.align_block < 2:
            raise UserError(f"align_block {self.align_block} must be at least 2")
        if self.min_gain_se < 0:
            raise UserError(f"min_gain_se {self.min_gain_se} must be at least 0")
        if self.eval_tokens < 1:
            raise UserError(f"eval_tokens {self.eval_tokens} must be at least 1")
