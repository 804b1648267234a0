"""The gradient pass's head gradients (atomic/gradstream._head_grads): every position's logits with the last
target ignored give the gradients of the next-token loss on the first S-1 positions bit for bit (no [B (S-1), V]
copy of the logits), and 0 at the last position."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from moecompress.atomic.gradstream import _head_grads


def _sliced(head: torch.nn.Module, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """dL/dh of the summed NLL of positions 1..S-1 on the sliced logits (the formula before)."""
    h = h.detach().requires_grad_(True)
    logits = head(h)
    flat = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    loss = F.cross_entropy(flat, ids[:, 1:].reshape(-1), reduction="sum")
    loss.backward()
    return h.grad


def test_head_grads_equal_the_sliced_loss_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    H, V = 24, 97
    for dtype in (torch.float32, torch.bfloat16):
        head = torch.nn.Sequential(torch.nn.LayerNorm(H), torch.nn.Linear(H, V, bias=False)).to(dtype)
        ids = [torch.randint(0, V, (3, 17), generator=g), torch.randint(0, V, (2, 17), generator=g)]
        hidden = [torch.randn(*b.shape, H, generator=g).to(dtype) for b in ids]
        grads: list[torch.Tensor] = []
        _head_grads(SimpleNamespace(batches=ids, device=torch.device("cpu"), head=head), hidden, grads)
        for got, h, b in zip(grads, hidden, ids, strict=True):
            want = _sliced(head, h, b)
            assert got.dtype == dtype and torch.equal(got, want)
            assert not bool(got[:, -1].any()) and bool(got[:, :-1].any())


def test_head_grads_in_position_chunks_equal_the_whole_batch(monkeypatch):
    """Past HEAD_LOGIT_BYTES the logits are made a chunk of positions at a time (equal chunks): the gradients are
    the whole batch's bit for bit, in fp32 and bf16."""
    from moecompress.atomic import gradstream

    g = torch.Generator().manual_seed(1)
    H, V, B, S = 64, 300, 3, 40
    assert gradstream.head_positions(B, S, V) == S  # 144 KB of logits: one piece
    for dtype in (torch.float32, torch.bfloat16):
        head = torch.nn.Sequential(torch.nn.LayerNorm(H), torch.nn.Linear(H, V, bias=False)).to(dtype)
        ids = [torch.randint(0, V, (B, S), generator=g)]
        hidden = [torch.randn(B, S, H, generator=g).to(dtype)]
        ls = SimpleNamespace(batches=ids, device=torch.device("cpu"), head=head)
        whole: list[torch.Tensor] = []
        _head_grads(ls, hidden, whole, V)
        for cap, step in ((4 * B * V * 12, 10), (4 * B * V * 13, 10), (4 * B * V * 33, 20)):
            monkeypatch.setattr(gradstream, "HEAD_LOGIT_BYTES", cap)
            assert gradstream.head_positions(B, S, V) == step
            parts: list[torch.Tensor] = []
            _head_grads(ls, hidden, parts, V)
            assert parts[0].dtype == dtype and torch.equal(parts[0], whole[0]), (dtype, cap)
        monkeypatch.undo()
        assert bool(whole[0][:, :-1].any()) and not bool(whole[0][:, -1].any())
