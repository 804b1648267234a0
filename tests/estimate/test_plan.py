"""`moecompress plan`: a table before any work, from config.json alone; --max-memory refusals up front."""

from __future__ import annotations

import shutil

import pytest
from conftest import tiny_config
from typer.testing import CliRunner

from moecompress.cli.main import app
from moecompress.core import limits
from moecompress.core.checkpoint import builtin_model_dir
from moecompress.core.errors import UserError
from moecompress.core.job import Job

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(autouse=True)
def _no_limit():
    yield
    limits.set_memory_limit(None)


def test_plan_of_a_config_only_folder(tmp_path) -> None:
    """A model folder with config.json and no weights: every operation gets a row."""
    (tmp_path / "config.json").write_text(tiny_config("deepseek_v3").to_json_string())
    res = run("plan", tmp_path, "--samples", "128", "--seq-len", "2048", "--device", "cpu")
    assert res.exit_code == 0, res.output
    for op in ("profile", "prune", "atom", "merge", "quantize", "compress"):
        assert f"│ {op}" in res.output, res.output
    assert "128 x 2048 = 262,144 tokens" in res.output and " yes " in res.output


def test_plan_says_what_does_not_fit() -> None:
    res = run("plan", "--op", "quantize", "--device", "cuda", "--gpu-memory", "1MB", "--host-memory", "1TB")
    assert res.exit_code == 0, res.output
    assert "no: " in res.output and "GPU" in res.output and "host memory" not in res.output
    res = run("plan", "--op", "profile", "--device", "cpu", "--max-memory", "1MiB")
    assert res.exit_code == 0 and "no: " in res.output and "host" in res.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--op", "shrink"), "--op 'shrink' is not one of"),
        (("--max-memory", "lots"), "--max-memory 'lots' is not a size"),
        (("--gpu-memory", "-3GB"), "--gpu-memory '-3GB' is not a size"),
        (("--device", "tpu"), "--device 'tpu' is not one of"),
        (("--samples", "0"), "--samples 0 is out of range"),
        (("--stages", "prune,fold"), "--stages 'prune,fold'"),
    ],
)
def test_plan_bad_input_is_one_line(args: tuple[str, ...], message: str) -> None:
    res = run("plan", *args)
    assert res.exit_code == 2, res.output
    lines = [l for l in res.output.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in res.output, res.output


def test_plan_of_a_folder_without_config(tmp_path) -> None:
    res = run("plan", tmp_path)
    assert res.exit_code == 2 and "has no config.json" in res.output


def test_job_refuses_up_front_under_max_memory(tmp_path) -> None:
    model = tmp_path / "m"
    shutil.copytree(builtin_model_dir(), model)
    Job.prepare(model, None, samples=4, seq_len=32, op="quantize", settings={"plan": "uniform"})  # fits
    limits.set_memory_limit(2**20)
    with pytest.raises(UserError) as err:
        Job.prepare(model, None, samples=4, seq_len=32, op="quantize", settings={"plan": "uniform"})
    msg = str(err.value)
    assert "quantize is predicted to need" in msg and "limit 1.0 MiB" in msg and "\n" not in msg
    Job.prepare(model, None, samples=4, seq_len=32)  # no op: no prediction, no refusal


@pytest.mark.parametrize("argv", [["profile"], ["prune", "--ratio", "0.25"], ["merge", "--ratio", "0.25"],
                                  ["compress", "--prune", "0.25"], ["quantize", "--bits", "4"]])  # fmt: skip
def test_commands_refuse_past_max_memory_in_one_line(tmp_path, argv: list[str]) -> None:
    out = tmp_path / "out"
    res = run(*argv, "--max-memory", "1MB", "--samples", "2", "--seq-len", "16", "--device", "cpu", "-o", out)
    assert res.exit_code == 2, res.output
    lines = [l for l in res.output.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and "is predicted to need" in lines[0] and "limit 976.6 KiB" in lines[0], res.output
    assert not out.exists()
    assert run(argv[0], "--max-memory", "lots").exit_code == 2
