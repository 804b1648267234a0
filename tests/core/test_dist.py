"""core/dist.py: identity at world 1; two gloo ranks share rows exactly and sum; end-to-end runs equal world 1."""

from __future__ import annotations

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


def run_ranks(argv: list[str], world: int = 2, timeout: float = 120) -> list[subprocess.CompletedProcess]:
    """Run ``python argv`` as ``world`` ranks of one gloo job (torchrun's environment, without torchrun)."""
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, *argv],
            env=rank_env(r, world, port),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]
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


def test_two_gloo_ranks_fill_rows_exactly_and_sum(tmp_path):
    script = tmp_path / "rows.py"
    script.write_text(_ROWS_SCRIPT)
    results = run_ranks([str(script)], world=2)
    for r, res in enumerate(results):
        assert res.returncode == 0, res.stderr[-3000:]
        assert res.stdout.strip() == f"ok {r}"
