"""End to end: real `profile` and `eval` sidecars -> `report` -> the page shows exactly the sidecars' numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import build_tiny
from test_report import _chart_cells, parse
from typer.testing import CliRunner

from moecompress.cli.main import app
from moecompress.core.checkpoint import builtin_model_dir

runner = CliRunner()


def _run(*args: object) -> None:
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output


def _check_page(run: Path) -> None:
    prof = json.loads((run / "profile.json").read_text())
    ev = json.loads((run / "eval.json").read_text())
    page = parse((run / "report.html").read_text(encoding="utf-8"))
    layers = prof["moe_layers"]
    for key in ("frequency", "reap", "max_abs_out"):
        cells = {(int(c["data-row"]), int(c["data-col"])): float(c["data-value"])
                 for c in _chart_cells(page, f"profile0-{key}")}  # fmt: skip
        assert len(cells) == len(layers) * prof["num_experts"]
        for e in prof["experts"]:
            assert cells[(layers.index(e["layer"]), e["expert"])] == e[key]
    keyed = page.keyed()
    for dom, ppl in ev["perplexity"].items():
        assert float(keyed[f"ppl.run.{dom}"]["data-value"]) == ppl
    assert float(keyed["profile.tokens"]["data-value"]) == prof["tokens"]
    assert len(page.find("rect", **{"class": "mark"})) == 4 * len(prof["super_experts"])


@pytest.mark.slow
def test_report_on_a_real_profile(tmp_path, tokenizer_dir):
    model = build_tiny("qwen3_moe", tmp_path / "model", tokenizer_dir)
    run = tmp_path / "run"
    _run("profile", model, "-o", run, "--samples", 4, "--seq-len", 32, "--device", "cpu")
    _run("eval", model, "--max-windows", 2, "--seq-len", 32, "--device", "cpu", "--json", run / "eval.json")
    _run("report", run)
    _check_page(run)


@pytest.mark.slow
@pytest.mark.skipif(not (builtin_model_dir() / "config.json").is_file(), reason="the built-in model is not trained yet")
def test_report_on_the_builtin_model(tmp_path):
    run = tmp_path / "run"
    _run("profile", "-o", run, "--samples", 16, "--seq-len", 128, "--device", "cpu")
    _run("eval", "--max-windows", 4, "--seq-len", 128, "--device", "cpu", "--json", run / "eval.json")
    _run("report", run)
    _check_page(run)
