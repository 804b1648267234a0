"""core/dist.py: identity at world 1; two gloo ranks share rows exactly and sum; end-to-end runs equal world 1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moecompress.core import dist

_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
        MOECOMPRESS_DIST_TIMEOUT="60",
        PYTHONPATH=str(_ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    return env


def start_ranks(argv: list[str], world: int = 2) -> list[subprocess.Popen]:
    """Start ``python argv`` as ``world`` ranks of one gloo job (torchrun's environment, without torchrun)."""
    port = free_port()
    return [
        subprocess.Popen(
            [sys.executable, *argv],
            env=rank_env(r, world, port),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]


def wait_ranks(procs: list[subprocess.Popen], timeout: float = 120) -> list[subprocess.CompletedProcess]:
    done = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done


def run_ranks(argv: list[str], world: int = 2, timeout: float = 120) -> list[subprocess.CompletedProcess]:
    return wait_ranks(start_ranks(argv, world), timeout)


def test_world_one_is_identity(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert (dist.world(), dist.rank(), dist.is_main()) == (1, 0, True)
    assert dist.share(5) == range(0, 5, 1)
    t = torch.arange(6, dtype=torch.int8).reshape(3, 2)
    before = t.clone()
    assert dist.fill_rows_(t, 3) is t and torch.equal(t, before)
    assert torch.equal(dist.all_reduce_sum_(t), before)
    dist.barrier()
    with pytest.raises(ValueError, match="rows"):
        dist.fill_rows_(t, 4)


_ROWS_SCRIPT = r"""
import torch
from moecompress.core import dist
w, r = dist.world(), dist.rank()
assert w == 2 and dist.is_main() == (r == 0)
n = 5
assert list(dist.share(n)) == list(range(r, n, w))
g = torch.Generator().manual_seed(0)
full = {
    torch.float32: torch.randn(n, 3, 5, generator=g),
    torch.bfloat16: torch.randn(n, 4, generator=g).to(torch.bfloat16),
    torch.int8: torch.randint(-128, 128, (n, 2, 3), generator=g, dtype=torch.int8),
    torch.float64: torch.tensor([-0.0, float("nan"), float("inf"), 1e-310, 2.0], dtype=torch.float64),
}
for dtype, ref in full.items():
    t = torch.full_like(ref, 99)
    for i in dist.share(n):
        t[i] = ref[i]
    dist.fill_rows_(t, n)
    assert torch.equal(t.view(torch.uint8), ref.view(torch.uint8)), dtype
# a view with non-contiguous rows: the columns 1::2 of a bigger tensor
base = torch.zeros(n, 6)
view = base[:, 1::2]
for i in dist.share(n):
    view[i] = torch.tensor([i, 10 * i, 100 * i], dtype=torch.float32)
dist.fill_rows_(view, n)
assert torch.equal(view, torch.arange(n, dtype=torch.float32)[:, None] * torch.tensor([1.0, 10.0, 100.0]))
assert torch.equal(base[:, 0::2], torch.zeros(n, 3))
# fewer rows than ranks
one = torch.full((1, 2), float(r))
dist.fill_rows_(one, 1)
assert torch.equal(one, torch.zeros(1, 2))
s = torch.full((2, 3), float(r + 1))
dist.all_reduce_sum_(s)
assert torch.equal(s, torch.full((2, 3), 3.0))
i = torch.tensor([r], dtype=torch.int64)
assert dist.all_reduce_sum_(i).item() == 1
h = torch.full((4,), 0.5, dtype=torch.bfloat16)
assert torch.equal(dist.all_reduce_sum_(h), torch.full((4,), 1.0, dtype=torch.bfloat16))
nc = torch.ones(4, 4)[:, ::2]
dist.all_reduce_sum_(nc)
assert torch.equal(nc, torch.full((4, 2), 2.0))
dist.barrier()
print("ok", r)
"""


# One process per rank: the dist calls above, then several commands (one process group), then their exit codes.
# With a "leave" command, rank 1 then leaves (os._exit, as a crashed rank would) and rank 0 runs that command: its
# first collective finds the peer gone, and the CLI must say so in one line and exit 2 (not hang, not abort).
_CLI_SCRIPT = r"""
import json, sys
import torch
from moecompress.cli.main import app
codes = []
for argv in json.loads(sys.argv[1]):
    torch.manual_seed(0)
    try:
        app(argv, prog_name="moecompress")
    except SystemExit as e:
        codes.append(e.code or 0)
leave = json.loads(sys.argv[2])
if len(sys.argv) > 3:  # the HEAPr gradient statistics of every layer, as each rank holds them
    from moecompress.atomic.gradstream import streamed_grad_stats
    from moecompress.core.checkpoint import Checkpoint

    ids = torch.randint(0, 320, (5, 16), generator=torch.Generator().manual_seed(1))
    st = streamed_grad_stats(Checkpoint(sys.argv[3]), ids, kind="full", batch_size=2)
    torch.save({l: (s.G, s.counts) for l, s in st.items()}, sys.argv[4] + f".{dist.rank()}")
print("codes", json.dumps(codes), flush=True)
if leave:
    if dist.rank() == 1:
        import os

        os._exit(0)
    try:
        app(leave, prog_name="moecompress")
    except SystemExit as e:
        print("after the peer left: exit", e.code, flush=True)  # not reached: the CLI leaves with os._exit(2)
"""

_SMALL = ["--samples", "5", "--seq-len", "32", "--batch-size", "1"]  # 5 batches: 3 on rank 0, 2 on rank 1
_COMMANDS = {  # the two with per-expert work split across ranks (the slow test adds profile, prune, ...)
    "atom": ["prune", "--granularity", "atom", "--ratio", "0.25", *_SMALL],
    "quantize4": ["quantize", "--bits", "4", "--plan", "uniform", *_SMALL],
}


def safetensors_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.safetensors"))}


def run_world1(model: Path, commands: dict[str, list[str]], out: Path) -> None:
    from typer.testing import CliRunner

    from moecompress.cli.main import app

    for name, argv in commands.items():
        torch.manual_seed(0)
        res = CliRunner().invoke(app, [argv[0], str(model), *argv[1:], "-o", str(out / name)])
        assert res.exit_code == 0, (name, res.output, res.exception)


def start_world2(
    model: Path,
    commands: dict[str, list[str]],
    out: Path,
    extra=(),
    grads: Path | None = None,
    leave: list[str] | None = None,
) -> list[subprocess.Popen]:
    """Two gloo ranks running ``commands`` (then ``extra`` argvs; then, given ``grads``, the gradient pass whose
    statistics each rank saves to grads.RANK) in one process each; then, given ``leave``, rank 1 leaves and rank 0
    runs that argv."""
    argvs = [[a[0], str(model), *a[1:], "-o", str(out / n)] for n, a in commands.items()] + list(extra)
    script = out.parent / "cli_rank.py"
    script.write_text(_ROWS_SCRIPT + _CLI_SCRIPT)
    more = [str(model), str(grads)] if grads is not None else []
    return start_ranks([str(script), json.dumps(argvs), json.dumps(leave), *more], world=2)


def assert_same_outputs(w1: Path, w2: Path, names) -> None:
    for name in names:
        a, b = safetensors_bytes(w1 / name), safetensors_bytes(w2 / name)
        assert a and sorted(a) == sorted(b), name
        for f in a:
            assert a[f] == b[f], f"{name}/{f}: 2 ranks wrote other bytes than 1 process"


def test_two_gloo_ranks_write_the_single_process_bytes(tmp_path, tokenizer_dir):
    """Two gloo ranks (one process each, so one import for all of it): fill_rows_ is exact for every dtype and
    all_reduce_sum_ sums; atom prune (profile, HEAPr, refit) and quantize 4-bit (GPTQ) over 5 batches (3 on
    rank 0, 2 on rank 1) write the same safetensors bytes and sidecars as one process; only rank 0 writes and
    prints results; a bad input fails on both ranks in one line, exit 2, without hanging; the gradient pass's G
    (each rank backpropagates its own batches, accumulates its own experts over every batch) is one process's G
    bit for bit, on both ranks."""
    from conftest import build_tiny

    model = build_tiny("mixtral", tmp_path / "model", tokenizer_dir)
    w1, w2 = tmp_path / "w1", tmp_path / "w2"
    too_few = ["profile", str(model), "--samples", "1", "--seq-len", "16", "-o", str(w2 / "bad")]
    leave = ["profile", str(model), *_SMALL, "-o", str(w2 / "peer")]
    procs = start_world2(model, _COMMANDS, w2, extra=[too_few], grads=tmp_path / "grads", leave=leave)
    run_world1(model, _COMMANDS, w1)  # meanwhile
    from moecompress.atomic.gradstream import streamed_grad_stats
    from moecompress.core.checkpoint import Checkpoint

    ids = torch.randint(0, 320, (5, 16), generator=torch.Generator().manual_seed(1))
    one = streamed_grad_stats(Checkpoint(model), ids, kind="full", batch_size=2)
    ranks = wait_ranks(procs, timeout=600)
    codes = "codes " + json.dumps([0] * len(_COMMANDS) + [2])
    for r, res in enumerate(ranks):
        assert res.returncode == (2 if r == 0 else 0), res.stderr[-3000:]  # rank 0's last command lost its peer
        assert codes in res.stdout.splitlines(), res.stderr[-3000:]
        errors = [ln for ln in res.stderr.splitlines() if "calibration batch" in ln]
        assert len(errors) == 1 and "for 2 ranks" in errors[0], res.stderr[-3000:]
    assert "written to" in ranks[0].stdout or "->" in ranks[0].stdout
    assert ranks[1].stdout.strip().splitlines() == ["ok 1", codes]
    assert ranks[0].stdout.startswith("ok 0\n") and ranks[0].stdout.strip().splitlines()[-1] == codes
    last = ranks[0].stderr.strip().splitlines()[-1]  # one line after the peer left, and no abort after it
    assert last.startswith("error: rank 0 of 2: another rank of this torchrun job failed or stopped"), last
    assert "by peer" in last, last  # gloo: "Connection closed by peer" or "... reset by peer"
    assert not (w2 / "peer").exists()
    assert_same_outputs(w1, w2, _COMMANDS)
    for r in range(2):
        got = torch.load(tmp_path / f"grads.{r}")
        assert sorted(got) == sorted(one)
        for l, st in one.items():
            assert torch.equal(got[l][1], st.counts) and torch.equal(got[l][0], st.G), (r, l)
    assert not (w2 / "bad").exists()
    assert sorted(p.name for p in w2.iterdir() if p.name != "cli_rank.py") == sorted(_COMMANDS)
    for name in _COMMANDS:  # the sidecars too (the timings aside)
        for f in (w1 / name).glob("*.json"):
            a, b = (json.loads((d / name / f.name).read_text()) for d in (w1, w2))
            assert _strip(a, str(w1)) == _strip(b, str(w2)), f"{name}/{f.name}"


def _strip(obj, root: str):
    """JSON with timings removed and the run folder replaced (the two runs wrote to different places)."""
    if isinstance(obj, dict):
        return {k: _strip(v, root) for k, v in obj.items() if k not in ("elapsed_s", "seconds", "created")}
    if isinstance(obj, list):
        return [_strip(v, root) for v in obj]
    if isinstance(obj, str):
        return obj.replace(root, "ROOT")
    return obj


_SLOW = ["--samples", "7", "--seq-len", "32", "--batch-size", "2"]  # 4 batches, the last one short
_ATOM = ["prune", "--granularity", "atom"]
_SLOW_COMMANDS = {
    "profile": ["profile", *_SLOW],
    "prune": ["prune", "--ratio", "0.25", *_SLOW],
    "atom-exact": [*_ATOM, "--ratio", "0.25", "--layout", "exact", *_SLOW],
    "atom-lowrank": [*_ATOM, "--ratio", "0.2", "--layout", "exact", "--hessian", "lowrank", "--rank", "4", *_SLOW],
    "merge": ["merge", "--ratio", "0.25", *_SLOW],
    "lp3": ["quantize", "--bits", "3", "--granularity", "expert", *_SLOW],
    "compress": ["compress", "--prune", "0.25", "--bits", "4", *_SLOW],
}


@pytest.mark.slow
def test_two_gloo_ranks_more_operations(tmp_path, tokenizer_dir):
    """DeepSeek-V3 (group routing, shared expert): profile, prune 25% (output-error: its layer_done reads every
    batch's outputs through the shared cache), atom prune exact layout (per-expert widths: refits exchanged
    padded) and lowrank G (sketches merged), merge, the LP bit plan (its probe reads the first batch through the
    shared cache) and a one-pass compress (profile observed on the gathered inputs before prune): the same bytes
    as one process."""
    from conftest import build_tiny

    model = build_tiny("deepseek_v3", tmp_path / "model", tokenizer_dir)
    w1, w2 = tmp_path / "w1", tmp_path / "w2"
    procs = start_world2(model, _SLOW_COMMANDS, w2)
    run_world1(model, _SLOW_COMMANDS, w1)
    ranks = wait_ranks(procs, timeout=900)
    for res in ranks:
        assert res.returncode == 0, res.stderr[-3000:]
        assert "codes " + json.dumps([0] * len(_SLOW_COMMANDS)) in res.stdout.splitlines(), res.stderr[-3000:]
    assert_same_outputs(w1, w2, _SLOW_COMMANDS)
