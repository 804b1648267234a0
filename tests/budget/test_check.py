"""The quantize-only guard judges on held-out windows (budget/check.py): transforms never see them, and the states
it compares are those windows' own."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import build_tiny

from moecompress.budget.check import FinalStates, HeldOutEngine, judge_windows
from moecompress.budget.measure import BudgetMeasure
from moecompress.core.engine import Engine
from moecompress.core.job import Job
from moecompress.prune.order import RouterSpec


@pytest.fixture(scope="module")
def job(tmp_path_factory, tokenizer_dir):
    model = build_tiny("qwen3_moe", tmp_path_factory.mktemp("m") / "qwen3", tokenizer_dir)
    return Job.prepare(model, None, samples=4, seq_len=32, batch_size=2)


def test_judge_windows_are_other_calibration_windows(job):
    fit = job.tokens().input_ids
    judge = judge_windows(job.tokens(), job.ckpt.path)
    assert judge is not None and judge.shape[1] == fit.shape[1] and judge.shape[0] >= 8
    assert not {tuple(r.tolist()) for r in judge} & {tuple(r.tolist()) for r in fit}
    assert torch.equal(judge, judge_windows(job.tokens(), job.ckpt.path))  # seeded


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
