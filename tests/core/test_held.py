"""core.held: a tensor in memory or, past a size, in a temporary file whose pages leave the process between uses; the
``park`` / ``unpark`` pair for state that waits unread; the engine's recorded mixer outputs parked through a layer's
transforms."""

from __future__ import annotations

import errno
import os

import torch
from torch import nn

from moecompress.core import held
from moecompress.core.engine import Replay
from moecompress.core.held import Held, park, unpark


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def test_held_in_memory_below_the_limit_and_in_a_file_above_it_keeps_values_and_drops_pages():
    small = Held.empty((4, 3), limit=1024)
    assert not small.spilled
    small.drop()  # a no-op in memory
    big = Held.empty((16, 1 << 20), limit=1024)  # 64 MiB
    assert big.spilled
    before = _rss()
    big.t.copy_(torch.arange(16, dtype=torch.float32)[:, None].expand(16, 1 << 20))
    filled = _rss()
    assert filled - before > 48 << 20  # the written pages are resident ...
    big.drop()
    assert filled - _rss() > 48 << 20  # ... until dropped
    assert torch.equal(big.t[:, 12345], torch.arange(16, dtype=torch.float32))  # the values come back from the file
    assert torch.equal(big.t[7], torch.full((1 << 20,), 7.0))
    assert not Held.empty((16, 1 << 20), "meta", limit=1024).spilled  # only CPU tensors go to a file
    t = torch.randn(100, 30, dtype=torch.float64)
    copy = Held.of(t, limit=0, block=7 * 30 * 8)  # written 7 rows at a time
    assert copy.spilled and copy.t.dtype == torch.float64 and torch.equal(copy.t, t)
    assert Held.of(t).t is t  # below the limit: the tensor itself


def test_unpark_gives_back_the_values_in_row_blocks():
    t = torch.randn(50, 7, dtype=torch.float64)
    h = park(t, 0)
    assert h.spilled
    out = unpark(h, block=3 * 7 * 8)
    assert torch.equal(out, t) and out.dtype == t.dtype
    small = park(t)  # below PARK_BYTES: the tensor itself
    assert not small.spilled and unpark(small) is t
    assert unpark(t) is t  # never parked


def test_no_room_for_the_file_keeps_the_tensor_in_memory(monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    h = Held.empty((64, 1024), limit=0)
    assert not h.spilled and h.t.shape == (64, 1024)
    t = torch.randn(64, 1024)
    assert Held.of(t, limit=0).t is t and not park(t, 0).spilled


def test_scalars_are_never_put_in_a_file():
    t = torch.tensor(3.0)
    assert Held.of(t, limit=0).t is t


def test_the_recorded_mixer_outputs_wait_in_files_and_replay_the_same(monkeypatch):
    """``Replay.park`` puts each recorded tensor past ``PARK_BYTES`` in a file (a tuple output's tensors too, other
    values kept); ``playing`` gives every batch back with the same values, with and without ``keep``."""

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.mlp = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            a = self.attn(x)
            return self.mlp(a + 1)

    layer = Layer()
    rep = Replay(layer, layer.mlp)
    xs = [torch.randn(5, 8), torch.randn(3, 8)]
    want = []
    with rep.recording():
        for x in xs:
            want.append(layer(x))
            rep.batch_done()
    assert rep.complete(2)
    recorded = [o.clone() for o in rep.outputs["attn"]]
    monkeypatch.setattr(held, "PARK_BYTES", 0)
    rep.park()
    assert all(isinstance(h, Held) and h.spilled for h in rep.outputs["attn"])
    layer.attn.weight.data.zero_()  # not run when replayed
    clones = []
    real_clone = torch.Tensor.clone
    monkeypatch.setattr(torch.Tensor, "clone", lambda t, *a, **k: clones.append(t) or real_clone(t, *a, **k))
    with rep.playing(1, keep=True):
        assert torch.equal(layer(xs[1]), want[1])
    assert not clones  # the file's copy is the copy: a parked batch is not copied twice
    assert isinstance(rep.outputs["attn"][1], Held)  # kept for a second replay
    for i, x in enumerate(xs):
        with rep.playing(i):
            assert torch.equal(layer(x), want[i])
        assert rep.outputs["attn"][i] is None  # replayed once, forgotten
    assert all(r.shape in ((5, 8), (3, 8)) for r in recorded)
