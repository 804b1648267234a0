"""Reorganizing the code must not change what any command writes: every safetensors file of a fixed set of runs
(tests/identity_cases.py) is byte-identical to the record made before the engine refactor.

Byte identity is asserted where torch and the CPU's vector instruction set match the record's (float results
depend on both); elsewhere each tensor's shape, dtype and sums must agree to 1e-5 relative."""

from __future__ import annotations

import json
import math

import pytest
from identity_cases import BUILTIN, CASES, RECORD, digest, machine, run_case  # noqa: F401

REC = json.loads(RECORD.read_text())


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("identity")


def _check(name, got):
    want = REC["cases"][name]
    assert sorted(got) == sorted(want), f"{name}: files {sorted(got)} != {sorted(want)}"
    exact = machine() == REC["machine"]
    for f, w in want.items():
        g = got[f]
        assert sorted(g["tensors"]) == sorted(w["tensors"]), f"{name}/{f}: tensor names differ"
        for k, (shape, dtype, s, a) in w["tensors"].items():
            gs, gd, gsum, gabs = g["tensors"][k]
            assert (gs, gd) == (shape, dtype), f"{name}/{f}/{k}: {gs} {gd} != {shape} {dtype}"
            assert math.isclose(gsum, s, rel_tol=1e-5, abs_tol=1e-6 * max(1.0, a)), f"{name}/{f}/{k}: sum {gsum} != {s}"
            assert math.isclose(gabs, a, rel_tol=1e-5, abs_tol=1e-9), f"{name}/{f}/{k}: abs-sum {gabs} != {a}"
        if exact:
            assert g["sha256"] == w["sha256"], f"{name}/{f}: bytes differ from the recorded baseline"


@pytest.mark.parametrize("name", sorted(CASES))
def test_tiny_outputs_are_byte_identical(name, workdir, tokenizer_dir):
    _check(name, run_case(name, workdir, tokenizer_dir))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_builtin_outputs_are_byte_identical(name, workdir):
    _check(name, run_case(name, workdir, None))
