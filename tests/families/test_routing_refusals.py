"""Operations that re-implement routing refuse a derived family whose router moecompress has not verified, in one
line that says where its routing differs and what works instead; operations that use the model's own routing run.
Phi-MoE: its sparsemixer (no RouterSpec variant routes as it; Flint's sigmoid without correction is one now)."""

from __future__ import annotations

import pytest
from family_models import build
from typer.testing import CliRunner

from moecompress.cli.main import app
from moecompress.core.checkpoint import Checkpoint

CAL = ["--samples", "2", "--seq-len", "16", "--device", "cpu"]


@pytest.fixture(scope="module")
def phimoe(tmp_path_factory, tokenizer_dir):
    path = build("phimoe", tmp_path_factory.mktemp("m") / "phimoe", tokenizer_dir)
    fam = Checkpoint(path).family
    assert fam.derived and not fam.routing_known and fam.routing_verified_by is None
    assert "weight for expert" in fam.routing_note  # the same experts, other weights
    return path


def _run(*argv):
    return CliRunner().invoke(app, [str(a) for a in argv])


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["prune", "--ratio", "0.25"], "--method frequency"),  # the default output-error search
        (["prune", "--ratio", "0.25", "--method", "reap", "--refit", "router"], "--refit none"),
        (["merge", "--ratio", "0.25"], "prune with --method frequency"),
        (["prune", "--granularity", "atom", "--ratio", "0.25"], "--refit none"),
        (["compress", "--prune", "0.25"], "method: frequency"),
    ],
)
def test_re_implemented_routing_is_refused(phimoe, tmp_path, argv, says):
    res = _run(argv[0], phimoe, *argv[1:], *CAL, "-o", tmp_path / "out")
    assert res.exit_code == 2, res.output
    assert says in res.output and "differs from moecompress's re-implementation on random inputs" in res.output
    assert not (tmp_path / "out").exists()


def test_the_models_own_routing_still_works(phimoe, tmp_path):
    res = _run("prune", phimoe, "--ratio", "0.25", "--method", "frequency", *CAL, "-o", tmp_path / "p")
    assert res.exit_code == 0, res.output
    res = _run("prune", phimoe, "--granularity", "atom", "--ratio", "0.25", "--refit", "none", *CAL,
               "-o", tmp_path / "a")  # fmt: skip
    assert res.exit_code == 0, res.output
