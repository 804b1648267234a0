"""The quantize-only guard judges on held-out windows (budget/check.py): transforms never see them, and the states
it compares are those windows' own."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import build_tiny
from moecompress.calibration.sets import encode_text, load_texts, load_tokenizer

from moecompress.budget.check import (
    JUDGE_PER_FIT,
    JUDGE_STATE_BYTES,
    MIN_JUDGE,
    FinalStates,
    HeldOutEngine,
    fitting_starts,
    judge_windows,
)
from moecompress.budget.execute import JUDGE_EXPERTS
from moecompress.budget.measure import BudgetMeasure
from moecompress.core.engine import Engine, Transform
from moecompress.core.job import Job
from moecompress.prune.order import RouterSpec


@pytest.fixture(scope="module")
def job(tmp_path_factory, tokenizer_dir):
    model = build_tiny("qwen3_moe", tmp_path_factory.mktemp("m") / "qwen3", tokenizer_dir)
    return Job.prepare(model, None, samples=4, seq_len=32, batch_size=2)


def test_judge_windows_are_every_unused_calibration_window_up_to_the_cap(job):
    """Judge windows: the calibration text's windows (end to end) that share no token position with a fitting window,
    every one of them up to JUDGE_PER_FIT per fitting window, spread over the domains."""
    tokens = job.tokens()
    fit = tokens.input_ids
    S = fit.shape[1]
    tok = load_tokenizer(job.ckpt.path)
    ids = {d: encode_text(tok, t) for d, t in load_texts(tokens.name, "calib").items()}
    starts = fitting_starts(ids, fit, tokens.seed or 0)
    assert starts is not None and sum(map(len, starts.values())) == fit.shape[0]
    free = {d: [k * S for k in range(len(v) // S) if all(abs(k * S - s) >= S for s in starts[d])]
            for d, v in ids.items()}  # fmt: skip
    every = judge_windows(tokens, job.ckpt.path, limit=10**9)
    assert every is not None and every.shape == (sum(map(len, free.values())), S)
    allowed = {tuple(ids[d][p : p + S].tolist()) for d in free for p in free[d]}
    assert {tuple(r.tolist()) for r in every} == allowed  # all of them, and only windows no fitting window touches
    judge = judge_windows(tokens, job.ckpt.path)
    assert judge is not None and judge.shape[0] == min(len(allowed), max(MIN_JUDGE, JUDGE_PER_FIT * fit.shape[0]))
    assert {tuple(r.tolist()) for r in judge} <= allowed
    big = JUDGE_STATE_BYTES // (4 * S * (MIN_JUDGE + 4))  # a hidden size whose states hold MIN_JUDGE + 4 windows
    capped = judge_windows(tokens, job.ckpt.path, hidden=big)
    assert capped is not None and capped.shape[0] == MIN_JUDGE + 4 < judge.shape[0]
    assert fitting_starts(ids, fit.flip(0), tokens.seed or 0) is None  # not the seeded draw: nothing is held out


class _Scale(Transform):
    """Leaves the layer's experts scaled by ``f`` as the written experts for the judge batches (or, ``apply``,
    scales the block itself)."""

    name, changes_block = "scale", False

    def __init__(self, f: float, apply: bool = False):
        self.f, self.apply = f, apply

    @torch.no_grad()
    def moe_layer(self, ctx):
        ex = ctx.experts
        if self.apply:
            ex.gate_up_proj.mul_(self.f)
            ex.down_proj.mul_(self.f)
        else:
            ctx.extra[JUDGE_EXPERTS] = (ex.gate_up_proj * self.f, ex.down_proj * self.f)


def test_judge_batches_run_once_through_the_written_experts(job, monkeypatch):
    """With written experts in ctx.extra, each judge batch runs through every layer once (not once with the source's
    experts and again with the written ones), and its states are those of the model holding the written experts;
    the fitting batches see the source's block."""
    fit = job.tokens().input_ids
    judge = judge_windows(job.tokens(), job.ckpt.path, limit=6)
    calls = []
    real = type(Engine(job.ckpt, fit[:2], 2).stream).run_layer

    def counted(self, layer, i):
        calls.append(i)
        return real(self, layer, i)

    monkeypatch.setattr(type(Engine(job.ckpt, fit[:2], 2).stream), "run_layer", counted)
    eng = HeldOutEngine(job.ckpt, fit, judge, 2, None, "held out")
    final, fitted = FinalStates(eng), []
    eng.run([_Scale(0.5)], emit=lambda ctx: (final(ctx), fitted.append(eng.cache[0].clone())))
    n_layers, n_moe, judged = len(eng.stream.decoder_layers), len(eng.moe), len(eng.cache) - eng.fit_batches
    # each judge batch: once up to the block in moe_inputs (its attention kept for the forward's replay), once in
    # the layer's forward (with a rerun through the written experts it would be n_moe more)
    assert len([i for i in calls if i >= eng.fit_batches]) == (n_layers + n_moe) * judged
    ref = Engine(job.ckpt, judge, 2)
    want = FinalStates(ref)
    ref.run([_Scale(0.5, apply=True)], emit=want)
    torch.testing.assert_close(final.states, want.states)
    plain = Engine(job.ckpt, fit, 2)
    src = []
    plain.run([], emit=lambda ctx: src.append(plain.cache[0].clone()))
    torch.testing.assert_close(fitted[-1], src[-1])  # the fitting batches ran through the source's experts


def test_held_out_windows_change_no_measurement_and_are_the_judged_states(job):
    """The measuring pass over fitting + judge windows measures exactly what it measures on the fitting windows
    alone (the judge windows would change the Hessians, moments and errors if a transform saw them), and the
    judged states are the judge windows' own final states."""
    fit = job.tokens().input_ids
    judge = judge_windows(job.tokens(), job.ckpt.path)
    spec = RouterSpec.from_config(job.ckpt.family, job.ckpt.config)
    small = {"fractions": (1.0, 0.5), "options": ((2, 4),), "probes": False}  # one cut, one width: a short test
    plain, held = BudgetMeasure(spec, **small), BudgetMeasure(spec, **small)
    Engine(job.ckpt, fit, 2).run([plain])
    eng = HeldOutEngine(job.ckpt, fit, judge, 2, None, "held out")
    final = FinalStates(eng)
    eng.run([held], emit=final)
    for l in plain.err:
        np.testing.assert_array_equal(plain.err[l], held.err[l])
        np.testing.assert_array_equal(plain.err_cut[l], held.err_cut[l])
        np.testing.assert_array_equal(plain.err_rm[l], held.err_rm[l])
        np.testing.assert_array_equal(plain.counts[l], held.counts[l])
    alone = Engine(job.ckpt, judge, 2)
    ref = FinalStates(alone)
    alone.run([], emit=ref)
    assert final.states is not None and ref.states is not None
    assert final.states.shape[0] == judge.shape[0]
    torch.testing.assert_close(final.states, ref.states)
    with_judge = BudgetMeasure(spec, **small)  # a judge window in the fit does change the measurement
    Engine(job.ckpt, torch.cat([fit, judge[:2]]), 2).run([with_judge])
    assert any(not np.array_equal(plain.err[l], with_judge.err[l]) for l in plain.err)
