"""What the quantize pass holds per calibration token: the routed inputs gathered without a joined copy and the
block-output error formed in place give the same values, bit for bit, as the whole-tensor expressions they replace."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moecompress.quant.layer import LayerCapture, _output_err


def _cap(E=6, H=24, T=50, batches=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cap = LayerCapture(E, H, 8)
    for b in range(batches):
        x = torch.randn(T + b, H, generator=gen)
        idx = torch.stack([torch.randperm(E - 1, generator=gen)[:2] for _ in range(T + b)])  # expert E-1: never
        cap.add_batch(x, idx, torch.softmax(torch.randn(T + b, 2, generator=gen), -1))
    return cap


@pytest.mark.parametrize("e", [0, 3, 5])
def test_routed_equals_joined_gathers(e):
    cap = _cap()
    xs, ps = [], []
    for x, idx, w in cap.batches:
        tok, pos = torch.where(idx == e)
        xs.append(x[tok])
        ps.append(w[tok, pos])
    xe, pe = cap.routed(e)
    assert torch.equal(xe, torch.cat(xs)) and torch.equal(pe, torch.cat(ps))
    assert xe.shape == (sum(t.shape[0] for t in xs), cap.hidden)
    assert (xe.shape[0] > 0) == (e != 5)


def test_routed_without_batches():
    xe, pe = LayerCapture(4, 16, 8).routed(1)
    assert xe.shape == (0, 16) and pe.shape == (0,)


@pytest.mark.parametrize("last", [False, True])
def test_output_err_bit_identical_and_drops_ref_when_last(last):
    gen = torch.Generator().manual_seed(1)
    n, H, I = 300, 40, 24
    hq, dn_q = torch.randn(n, I, generator=gen), torch.randn(H, I, generator=gen)
    ref, p = torch.randn(n, H, generator=gen), torch.rand(n, generator=gen)
    want = ((nn.functional.linear(hq, dn_q) - ref) * p.unsqueeze(-1)).double().pow(2).sum().item()
    refs = [None, ref.clone()]
    got = _output_err(hq, dn_q, refs, 1, p, last)
    assert got == want
    assert (refs[1] is None) == last
    if not last:
        assert torch.equal(refs[1], ref)  # kept unchanged for the next width
