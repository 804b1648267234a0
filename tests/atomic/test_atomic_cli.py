"""`moecompress prune --granularity atom` through the CLI, and the exact layout through moecompress.load."""

import json

from conftest import build_tiny
from typer.testing import CliRunner

from moecompress.atomic.load import LAYOUT
from moecompress.cli.main import app
from moecompress.core import loading
from moecompress.core.manifest import Manifest

ARGS = ["--samples", "4", "--seq-len", "32", "--batch-size", "4", "--device", "cpu"]


def test_cli_prune_atoms_and_refusals(tmp_path, tokenizer_dir):
    src = build_tiny("qwen3_moe", tmp_path / "src", tokenizer_dir, moe_intermediate_size=32)
    runner = CliRunner()
    out = tmp_path / "out"
    res = runner.invoke(
        app, ["prune", str(src), "--granularity", "atom", "--ratio", "0.5", "--hessian", "lowrank", "--rank", "4",
              *ARGS, "-o", str(out)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    man = Manifest.read(out).stage("atom")
    assert man["hessian"] == "lowrank" and man["hessian_rank"] == 4 and man["width"] == 16
    assert json.loads((out / "config.json").read_text())["moe_intermediate_size"] == 16
    for bad, msg in [
        (["--ratio", "0"], "between 0 and 1"),
        (["--ratio", "0.5", "--hessian", "kfac"], "--hessian"),
        (["--ratio", "0.5", "--method", "random"], "not an atom score"),
    ]:
        res = runner.invoke(app, ["prune", str(src), "--granularity", "atom", *bad, *ARGS, "-o", str(tmp_path / "x")])
        assert res.exit_code == 2 and msg in res.output, res.output
        assert not (tmp_path / "x").exists()


def test_exact_output_loads_through_moecompress_load(tmp_path, tokenizer_dir, monkeypatch):
    src = build_tiny("qwen3_moe", tmp_path / "src", tokenizer_dir)
    out = tmp_path / "out"
    res = CliRunner().invoke(
        app, ["prune", str(src), "--granularity", "atom", "--ratio", "0.3", "--layout", "exact", "--method",
              "magnitude", *ARGS, "-o", str(out)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads((out / "moecompress.json").read_text())["layout"] == LAYOUT
    model = loading.load(out)
    widths = Manifest.read(out).stage("atom")["layers"]["0"]["widths"]
    assert model.model.layers[0].mlp.experts.down_proj.shape[-1] == 16 * -(-max(widths) // 16)


def test_cli_atom_refit_flag(tmp_path, tokenizer_dir):
    """--refit down (default) compensates the kept down_proj columns; --refit none slices them plainly."""
    src = build_tiny("qwen3_moe", tmp_path / "src", tokenizer_dir, moe_intermediate_size=32)
    runner = CliRunner()
    common = ["prune", str(src), "--granularity", "atom", "--ratio", "0.5", "--method", "magnitude", *ARGS]
    for flag, compensated in ((["--refit", "none"], False), ([], True)):
        out = tmp_path / f"out-{compensated}"
        res = runner.invoke(app, [*common, *flag, "-o", str(out)])
        assert res.exit_code == 0, res.output
        assert (Manifest.read(out).stage("atom")["compensation"] is not None) == compensated
    res = runner.invoke(app, [*common, "--refit", "router", "-o", str(tmp_path / "x")])
    assert res.exit_code == 2 and "--refit 'router'" in res.output, res.output
    assert not (tmp_path / "x").exists()
