"""Fault injection for outputs: never lose a user's file, fail before the work, one line and no traceback.

Every refusal here asserts exit code 2 (130 for Ctrl-C), exactly one line on stderr, no traceback, nothing left at
the output (no temporary either) and the inputs' bytes unchanged.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import build_tiny
from typer.testing import CliRunner

from moecompress.cli.main import app
from moecompress.core import writer

TEMP = re.compile(r"^\..+\.(tmp-\d+-\d+|old-\d+)$")
CALIB = ("--samples", "2", "--seq-len", "16", "--device", "cpu")


def run(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line(res, code: int = 2, message: str | None = None) -> str:
    """Exit ``code``, exactly one line on stderr (containing ``message``), no traceback anywhere."""
    assert res.exit_code == code, (res.exit_code, res.output, res.exception)
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.output and not isinstance(res.exception, (AssertionError, TypeError)), res.output
    if message is not None:
        assert message in lines[0], lines[0]
    return lines[0]


def hashes(*folders: Path) -> dict[str, str]:
    """sha256 of every file under the folders (the inputs whose bytes must never change)."""
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for f in folders
        for p in sorted(Path(f).rglob("*"))
        if p.is_file()
    }


def temps(*folders: Path) -> list[Path]:
    return [p for f in folders for p in Path(f).rglob(".*") if TEMP.match(p.name)]


@pytest.fixture(scope="module")
def area(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    """A tiny model M, its profile run R and a pruned output P (a folder moecompress wrote), built once."""
    root = tmp_path_factory.mktemp("safety")
    m = build_tiny("qwen3_moe", root / "model", tokenizer_dir)
    res = run("profile", m, "-o", root / "run", *CALIB)
    assert res.exit_code == 0, res.output
    res = run("prune", m, "--ratio", "0.34", "--profile", root / "run", "-o", root / "pruned", *CALIB)
    assert res.exit_code == 0, res.output
    text = root / "text.txt"
    text.write_text("To be, or not to be, that is the question. " * 40)
    return {"root": root, "model": m, "run": root / "run", "pruned": root / "pruned", "text": text}


# ---- 1. data loss ------------------------------------------------------------------------------------------------


def test_file_outputs_never_replace_an_input_or_an_existing_file(area, tmp_path):
    m, r, p, text = area["model"], area["run"], area["pruned"], area["text"]
    (tmp_path / "link").symlink_to(m, target_is_directory=True)
    (tmp_path / "facts.json").symlink_to(m / "config.json")
    before = hashes(m, r, p, text.parent)
    cases = [
        (["eval", m, "--json", m / "config.json"], "is inside the input"),
        (["eval", m, "--json", m / "config.json", "--overwrite"], "is inside the input"),
        (["eval", m, "-o", m / "eval.json"], "is inside the input"),  # a plain HF folder is not moecompress's
        (["eval", p, "--json", p / "config.json", "--overwrite"], "is inside the input"),
        (["eval", m, "--base", p, "--json", p / "moecompress.json", "--overwrite"], "is inside the input"),
        (["eval", m, "--base", p, "--json", p / "eval.json"], "is inside the input"),  # not the evaluated model's
        (["eval", m, "--data", text, "--json", text, "--overwrite"], "is the input"),
        (["eval", m, "--json", r / "profile.json"], "already exists"),
        (["info", m, "--json", m / "model.safetensors", "--overwrite"], "is inside the input"),
        (["info", m, "--json", tmp_path / "link" / "config.json", "--overwrite"], "is inside the input"),
        (["info", m, "--json", tmp_path / "facts.json", "--overwrite"], "is inside the input"),  # symlink into M
        (["report", r, "-o", m / "model.safetensors"], "already exists"),
        (["report", r, "-o", r / "profile.json", "--overwrite"], "is inside the input"),
        (["report", p, r, "-o", r / "sub" / "x.html"], "is inside the input"),
        (["report", r, "-o", r], "is the input"),
        (["report", p, "-o", r / "x.html"], "is inside the input"),  # R: the profile run P's manifest names
    ]
    for args, msg in cases:
        one_line(run(*args), 2, msg)
    assert hashes(m, r, p, text.parent) == before
    assert not temps(area["root"], tmp_path)
    assert not (r / "sub").exists()


def test_folder_outputs_and_overwrite(area, tmp_path):
    m, r, p = area["model"], area["run"], area["pruned"]
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("my notes")
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(m, target_is_directory=True)
    before = hashes(m, r, p, user)
    cases = [
        (["profile", m, "-o", user, "--overwrite", *CALIB], "not a folder moecompress wrote"),
        (["profile", m, "-o", user, *CALIB], "already exists"),
        (["prune", m, "--ratio", "0.34", "--profile", r, "-o", r, "--overwrite"], "is the input"),
        (["prune", m, "--ratio", "0.34", "--profile", r, "-o", r / "x", "--overwrite"], "is inside the input"),
        (["merge", m, "--profile", r, "-o", m, "--overwrite"], "is the input"),
        (["quantize", m, "--bits", "4", "-o", tmp_path / "link" / "q", "--overwrite"], "is inside the input"),
        (["quantize", p, "--bits", "4", "-o", p.parent, "--overwrite"], "contains the input"),
        (["profile", m, "-o", tmp_path / "file", "--overwrite", *CALIB], "is a file, not a folder"),
        (["profile", m, "--calib", area["text"], "-o", area["text"], "--overwrite"], "is the input"),
    ]
    for args, msg in cases:
        one_line(run(*args), 2, msg)
    assert hashes(m, r, p, user) == before
    assert not temps(area["root"], tmp_path)
    # --overwrite replaces a folder moecompress wrote (a profile run) and an empty folder
    shutil.copytree(r, tmp_path / "old-run")
    (tmp_path / "empty").mkdir()
    for target in (tmp_path / "old-run", tmp_path / "empty"):
        res = run("profile", m, "-o", target, "--overwrite", "--seed", "1", *CALIB)
        assert res.exit_code == 0, res.output
        assert (
            json.loads((target / "profile.json").read_text())["calibration"]
            != json.loads((r / "profile.json").read_text())["calibration"]
        )
    assert not temps(tmp_path)


def test_own_sidecars_in_own_folders_are_allowed(area):
    """The README flow: eval an output with --json OUT/eval.json, then `report OUT` regenerates OUT/report.html."""
    m, p = area["model"], area["pruned"]
    weights = hashes(p)
    res = run("eval", p, "--base", m, "--seq-len", "16", "--max-windows", "1", "--json", p / "eval.json")
    assert res.exit_code == 0, res.output
    one_line(run("eval", p, "--seq-len", "16", "--max-windows", "1", "--json", p / "eval.json"), 2, "already exists")
    old = (p / "report.html").read_bytes()
    res = run("report", p)
    assert res.exit_code == 0, res.output
    assert (p / "report.html").read_bytes() != old  # regenerated with the eval results, no --overwrite needed
    assert {k: v for k, v in hashes(p).items() if not k.endswith(("eval.json", "report.html"))} == {
        k: v for k, v in weights.items() if not k.endswith("report.html")
    }
    (p / "eval.json").unlink()
    res = run("report", p)  # back to the state other tests expect
    assert res.exit_code == 0, res.output


def test_stale_temporaries_of_dead_processes_are_removed(area, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".facts.json.tmp-{dead.pid}-1700000000000"
    stale.mkdir()
    (stale / "model-00001-of-00001.safetensors").write_bytes(b"\0" * 1_000_000)
    old = tmp_path / f".run.old-{dead.pid}"
    old.mkdir()
    live = tmp_path / ".other.tmp-1-1700000000000"  # pid 1 is alive: never touched
    live.mkdir()
    user = tmp_path / ".notes.tmp"
    user.write_text("not ours")
    res = run("info", area["model"], "--json", tmp_path / "facts.json")
    assert res.exit_code == 0, res.output
    line = one_line(res, 0, "removed 2 stale temporary item(s) of interrupted runs")
    assert stale.name in line and old.name in line
    assert not stale.exists() and not old.exists() and live.exists() and user.exists()
    assert json.loads((tmp_path / "facts.json").read_text())["routed_experts"] == 6


def test_help_shows_where_temporaries_go():
    for cmd in ("profile", "prune", "merge", "quantize", "eval", "info", "report"):
        res = run(cmd, "--help")
        text = re.sub(r"[\s│]+", "", res.output)
        assert res.exit_code == 0 and ".NAME.tmp-PID-*besideit" in text, (cmd, res.output)


# ---- 3. fail before the work, in one line --------------------------------------------------------------------------


@pytest.fixture
def no_compute(monkeypatch):
    """Make every compute entry point fail the test: the refusals must come before any of them."""

    def boom(*a, **k):
        raise AssertionError("compute ran before the output was checked")

    import moecompress.core.evaluate
    import moecompress.merge.run
    import moecompress.profile.run
    import moecompress.prune.run
    import moecompress.quant.run

    for mod, name in (
        (moecompress.profile.run, "run_profile"),
        (moecompress.prune.run, "prune_model"),
        (moecompress.merge.run, "merge_model"),
        (moecompress.quant.run, "run_quantize"),
        (moecompress.core.evaluate, "evaluate"),
    ):
        monkeypatch.setattr(mod, name, boom)


def _fail_mkdir_under(monkeypatch, folder: Path, err: int) -> None:
    real = os.mkdir

    def fake(path, *a, **k):
        if str(path).startswith(str(folder)):
            raise OSError(err, os.strerror(err), str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(os, "mkdir", fake)
    real_open = os.open

    def fake_open(path, flags, *a, **k):
        if str(path).startswith(str(folder)) and flags & os.O_CREAT:
            raise OSError(err, os.strerror(err), str(path))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", fake_open)


@pytest.mark.parametrize("where", ["parent_is_file", "read_only", "no_permission", "missing_under_read_only"])
def test_unwritable_output_fails_before_any_compute(area, tmp_path, monkeypatch, no_compute, where):
    m, r = area["model"], area["run"]
    (tmp_path / "file").write_text("x")
    ro = tmp_path / "ro"
    ro.mkdir()
    target, msg = {
        "parent_is_file": (tmp_path / "file" / "out", "a parent of it is a file"),
        "read_only": (ro / "out", "Read-only file system"),
        "no_permission": (ro / "out", "Permission denied"),
        "missing_under_read_only": (ro / "a" / "b" / "out", "Read-only file system"),
    }[where]
    _fail_mkdir_under(monkeypatch, ro, errno.EACCES if where == "no_permission" else errno.EROFS)
    before = hashes(m, r)
    for args in (
        ["profile", m, "-o", target, *CALIB],
        ["prune", m, "--ratio", "0.34", "--profile", r, "-o", target],
        ["merge", m, "-o", target],
        ["quantize", m, "--bits", "4", "-o", target],
        ["eval", m, "--json", target / "e.json" if where != "read_only" else ro / "e.json"],
        ["info", m, "--json", target / "f.json" if where != "read_only" else ro / "f.json"],
        ["report", r, "-o", target / "r.html" if where != "read_only" else ro / "r.html"],
    ):
        line = one_line(run(*args), 2, msg)
        assert line.startswith("error: cannot write") and "nothing was written" in line
    assert list(ro.iterdir()) == [] and (tmp_path / "file").read_text() == "x"
    assert hashes(m, r) == before


def test_disk_full_while_writing_removes_the_temporary(area, tmp_path, monkeypatch):
    import pathlib

    from safetensors import SafetensorError

    import moecompress.profile.run

    m, r = area["model"], area["run"]

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(a[1] if len(a) > 1 else ""))

    monkeypatch.setattr(moecompress.profile.run, "save_file", full)
    line = one_line(run("profile", m, "-o", tmp_path / "new" / "run", *CALIB), 2, "No space left on device")
    assert "the partial output was removed" in line
    assert not (tmp_path / "new").exists()  # the parent it created is gone too
    monkeypatch.undo()

    def full_st(*a, **k):  # what safetensors really raises on a full disk
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(writer, "save_file", full_st)
    one_line(run("prune", m, "--ratio", "0.34", "--profile", r, "-o", tmp_path / "p"), 2, "No space left on device")
    monkeypatch.undo()

    real = pathlib.Path.write_text

    def full_text(self, *a, **k):
        if self.name.startswith(".e.json.tmp-"):
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "write_text", full_text)
    one_line(
        run("eval", m, "--seq-len", "16", "--max-windows", "1", "--json", tmp_path / "e.json"),
        2,
        "No space left on device",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.slow
def test_file_too_large_for_real_in_a_subprocess(area, tmp_path):
    """No patching: the OS refuses the write (RLIMIT_FSIZE -> EFBIG) half-way through the shards."""
    import resource

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, 64_000))

    before = hashes(area["model"], area["run"])
    out = tmp_path / "p"
    proc = subprocess.run(
        [sys.executable, "-m", "moecompress.cli", "prune", str(area["model"]), "--ratio", "0.34", "--profile",
         str(area["run"]), "-o", str(out), "--device", "cpu"],
        capture_output=True, text=True, preexec_fn=limit, env={**os.environ, "MOECOMPRESS_QUIET": "1"}, timeout=300,
    )  # fmt: skip
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "File too large" in lines[0] and "Traceback" not in proc.stderr
    assert not out.exists() and not temps(tmp_path)
    assert hashes(area["model"], area["run"]) == before


NUMERIC = [
    (["profile", "--batch-size", "0"], "--batch-size 0 is out of range: use a whole number at least 1"),
    (["profile", "--sim-tokens", "0"], "--sim-tokens 0 is out of range"),
    (["profile", "--sim-tokens", "-5"], "--sim-tokens -5 is out of range"),
    (["profile", "--samples", "0"], "--samples 0 is out of range"),
    (["profile", "--seq-len", "1"], "--seq-len 1 is out of range: use a whole number at least 2"),
    (["profile", "--seed", "-1"], "--seed -1 is out of range"),
    (["profile", "--min-tokens", "-1"], "--min-tokens -1 is out of range"),
    (["eval", "--max-windows", "-1"], "--max-windows -1 is out of range: use a whole number at least 1"),
    (["eval", "--max-windows", "0"], "--max-windows 0 is out of range"),
    (["eval", "--batch-size", "0"], "--batch-size 0 is out of range"),
    (["eval", "--seq-len", "0"], "--seq-len 0 is out of range"),
    (["quantize", "--budget-gb", "nan"], "--budget-gb nan is out of range: use a finite number greater than 0"),
    (["quantize", "--budget-gb", "inf"], "--budget-gb inf is out of range"),
    (["quantize", "--budget-gb", "-1"], "--budget-gb -1 is out of range"),
    (["quantize", "--bits", "nan"], "--bits nan is out of range: use a finite number at least 2 and at most 8"),
    (["quantize", "--bits", "9"], "--bits 9 is out of range"),
    (["quantize", "--bits", "4", "--min-tokens", "-3"], "--min-tokens -3 is out of range"),
    (["prune", "--ratio", "nan"], "--ratio nan is out of range: use a number between 0 and 1"),
    (["prune", "--ratio", "0.5", "--error-tokens", "0"], "--error-tokens 0 is out of range"),
    (["prune", "--ratio", "0.5", "--rank", "0"], "--rank 0 is out of range"),
    (["merge", "--ratio", "inf"], "--ratio inf is out of range"),
    (["merge", "--rank-fraction", "nan"], "--rank-fraction nan is out of range"),
    (["merge", "--rank-fraction", "0"], "--rank-fraction 0 is out of range: use a finite number greater than 0"),
    (["merge", "--rank", "-2"], "--rank -2 is out of range"),
    (["merge", "--sim-tokens", "0"], "--sim-tokens 0 is out of range"),
]


@pytest.mark.parametrize("args,msg", NUMERIC, ids=[" ".join(a) for a, _ in NUMERIC])
def test_numeric_options_are_checked_up_front(area, tmp_path, no_compute, args, msg):
    cmd, *rest = args
    out = ["--json", tmp_path / "o.json"] if cmd == "eval" else ["-o", tmp_path / "o"]
    one_line(run(cmd, area["model"], *rest, *out), 2, msg)
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_exits_130_in_one_line(area, tmp_path, monkeypatch):
    import moecompress.core.evaluate
    import moecompress.profile.run

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(moecompress.profile.run, "collect", interrupt)
    line = one_line(run("profile", area["model"], "-o", tmp_path / "deep" / "run", *CALIB), 130)
    assert line == "interrupted; nothing was written"
    monkeypatch.setattr(moecompress.core.evaluate, "evaluate", interrupt)
    line = one_line(run("eval", area["model"], "--json", tmp_path / "e.json"), 130)
    assert line == "interrupted; nothing was written"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_sigint_for_real_in_a_subprocess(area, tmp_path):
    """A real SIGINT while profile computes: exit 130, one line, the temporary created up front is removed."""
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moecompress.cli", "profile", str(area["model"]), "-o", str(out), "--samples", "2048",
         "--seq-len", "64", "--batch-size", "1", "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "MOECOMPRESS_QUIET": "1"},
    )  # fmt: skip
    deadline = time.time() + 120
    while not temps(tmp_path) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert temps(tmp_path), "the temporary folder is created before the calibration pass"
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    lines = [l for l in err.splitlines() if l.strip()]
    assert proc.returncode == 130 and lines == ["interrupted; nothing was written"], err
    assert not out.exists() and not temps(tmp_path)


# ---- 6. results on stdout, diagnostics on stderr -----------------------------------------------------------------


def test_info_table_goes_to_stdout(area):
    res = run("info", area["model"])
    assert res.exit_code == 0 and "Qwen3-MoE" in res.stdout and res.stderr == "", res.output


def test_eval_error_has_no_loading_bar(area):
    """The seq-len check runs after the model is loaded: transformers' "Loading weights" bar must not show."""
    one_line(run("eval", area["model"], "--seq-len", "100000"), 2, "larger than the model's context")


def test_eval_prints_kl_with_three_significant_digits(area, tmp_path, tokenizer_dir):
    other = build_tiny("qwen3_moe", tmp_path / "other", tokenizer_dir, seed=1)
    res = run("eval", other, "--base", area["model"], "--seq-len", "16", "--max-windows", "1", "--json", tmp_path / "e")
    assert res.exit_code == 0, res.output
    kl = json.loads((tmp_path / "e").read_text())["kl_to_base"]
    shown = re.search(r"KL\(base \|\| model\) = (\S+) ", res.stdout)
    assert kl > 0 and shown and shown.group(1) == f"{kl:.3g}", res.stdout
    assert float(shown.group(1)) != 0 and abs(float(shown.group(1)) - kl) <= 0.005 * kl


@pytest.mark.slow
def test_sigkill_leftover_is_removed_by_the_next_run(area, tmp_path):
    """SIGKILL cannot be caught: the next run into the same folder removes the dead process's temporary."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "moecompress.cli", "profile", str(area["model"]), "-o", str(tmp_path / "run"),
         "--samples", "2048", "--seq-len", "64", "--batch-size", "1", "--device", "cpu"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "MOECOMPRESS_QUIET": "1"},
    )  # fmt: skip
    deadline = time.time() + 120
    while not temps(tmp_path) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    left = temps(tmp_path)
    proc.kill()
    proc.wait()
    assert left and all(p.exists() for p in left)
    res = run("info", area["model"], "--json", tmp_path / "facts.json")
    line = one_line(res, 0, "removed 1 stale temporary item(s)")
    assert left[0].name in line and not temps(tmp_path) and not (tmp_path / "run").exists()


def test_written_shards_are_readable_like_every_other_file(tmp_path):
    """safetensors creates its files 0600; a written checkpoint's shards get the mode plain files get (umask)."""
    import torch

    writer.write_shards(tmp_path, [("w", torch.zeros(2))])
    (tmp_path / "plain.txt").write_text("x")
    shard = next(tmp_path.glob("model-*.safetensors"))
    assert shard.stat().st_mode & 0o777 == (tmp_path / "plain.txt").stat().st_mode & 0o777
