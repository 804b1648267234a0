"""HEAPr's scoring with the experts on an accelerator, run on the CPU through a fake device (``OnFake``): the
layer's down projections stay where they are (no host or float64 copy of the whole [E, H, I]), each expert is
computed where G lives, only the [E, I] scores come to the CPU, and the scores equal the all-CPU ones bit for bit.

``OnFake`` tensors hold CPU memory but report ``cuda:0`` and act like a device CUDA would refuse to mix: an op with
a fake tensor and a (non-scalar) CPU tensor raises, ``.to("cpu")`` / ``.cpu()`` is a transfer (a copy), and
``torch.zeros(..., device=<the fake's device>)`` fails on this CUDA-less build as allocating on the GPU would need
the GPU. Every copy as large as the watched layer is recorded."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from moecompress.atomic import run
from moecompress.atomic.gradstats import LayerGradStats
from moecompress.atomic.heapr import ChunkedG, LowRankG, heapr_scores

FAKE = torch.device("cuda", 0)


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _tensors(y)


def _wrap(x):
    if isinstance(x, torch.Tensor):
        return x.as_subclass(OnFake)
    if isinstance(x, (list, tuple)):
        return type(x)(_wrap(y) for y in x)
    return x


class OnFake(torch.Tensor):
    watch = 0  # numel of the layer-sized tensor: copies at least this large are recorded
    copies: list[str] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__self__", None) is torch.Tensor.device:
            return FAKE
        with torch._C.DisableTorchFunctionSubclass():
            ins = list(_tensors(args)) + list(_tensors(kwargs))
            fake = [t for t in ins if isinstance(t, OnFake)]
            if func in (torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.cuda):
                return cls._move(func, args, kwargs)
            plain = [t for t in ins if not isinstance(t, OnFake) and t.dim() > 0]
            if fake and plain:
                raise RuntimeError(f"{func.__name__}: tensors on {FAKE} and cpu (the fake device)")
            out = func(*args, **kwargs)
            cls._record(func.__name__, out, ins)
            return _wrap(out) if fake else out

    @classmethod
    def _move(cls, func, args, kwargs):
        src, dev, dtype = args[0], FAKE, None
        if func is torch.Tensor.cpu:
            dev = torch.device("cpu")
        for a in [*args[1:], *kwargs.values()]:
            if isinstance(a, torch.dtype):
                dtype = a
            elif isinstance(a, (str, torch.device)):
                dev = torch.device(a)
        out = src.to(dtype) if dtype is not None else src
        if dev.type == "cpu":  # a transfer to the host: always a copy, and no longer on the device
            out = out.clone() if out.untyped_storage().data_ptr() == src.untyped_storage().data_ptr() else out
            cls._record(f"{func.__name__}(cpu)", out, [src])
            return out.as_subclass(torch.Tensor)
        cls._record(f"{func.__name__}({dtype})", out, [src])
        return out.as_subclass(OnFake)

    @classmethod
    def _record(cls, name, out, ins):
        ptrs = {t.untyped_storage().data_ptr() for t in ins}
        for t in _tensors(out):
            if t.numel() >= cls.watch > 0 and t.untyped_storage().data_ptr() not in ptrs:
                cls.copies.append(f"{name} -> {tuple(t.shape)} {t.dtype}")


def on_fake(t: torch.Tensor) -> torch.Tensor:
    return t.clone().as_subclass(OnFake)


E, H, I = 6, 16, 12


def _case(kind: str, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    down = torch.randn(E, H, I, generator=g).to(dtype)
    m = torch.rand(E, I, generator=g)
    A = torch.randn(E, H, H, generator=g)
    full = A @ A.transpose(1, 2) / H
    if kind in ("full", "full-host"):
        G = full
    elif kind == "diag":
        G = full.diagonal(dim1=1, dim2=2).clone()
    elif kind == "lowrank":
        G = LowRankG(torch.randn(E, H, 3, generator=g), torch.rand(E, H, generator=g))
    else:
        G = full  # chunked: built per chunk below
    return down, m, G


def _fake_g(kind: str, G):
    """G as the gradient pass leaves it under --device cuda: a chunked full G is built on the device, a finished
    one (``gradstats.finish``) comes to the host."""
    if kind == "chunked":
        return ChunkedG(E, 4, lambda ids: on_fake(G[ids]))
    if kind == "full-host":
        return G
    if isinstance(G, LowRankG):
        return LowRankG(on_fake(G.factors), on_fake(G.residual_diag))
    return on_fake(G)


def _cpu_g(kind: str, G):
    return ChunkedG(E, 4, lambda ids: G[ids].clone()) if kind == "chunked" else G


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["full", "full-host", "chunked", "diag", "lowrank"])
def test_streamed_scores_keep_the_downs_on_the_device(monkeypatch, kind, dtype):
    down, m, G = _case(kind, dtype)
    ref = heapr_scores(m, down, _cpu_g(kind, G))  # all on the CPU
    experts = SimpleNamespace(down_proj=on_fake(down))

    def fake_pass(ckpt, input_ids, hessian, rank, batch_size, device, on_layer, split_experts):
        assert split_experts
        return {3: on_layer(3, LayerGradStats(G=_fake_g(kind, G), counts=torch.ones(E), m=None), experts)}

    monkeypatch.setattr(run, "streamed_grad_stats", fake_pass)
    monkeypatch.setattr(OnFake, "watch", down.numel())
    monkeypatch.setattr(OnFake, "copies", [])
    got = run.streamed_scores(None, {3: m}, torch.zeros(1, 1, dtype=torch.long), "full")[3]
    assert type(got) is torch.Tensor and got.device.type == "cpu" and got.dtype == torch.float64
    assert torch.equal(got, ref) and got.abs().sum() > 0
    assert OnFake.copies == []  # no copy of the whole layer: not to the host, not upcast


def test_the_fake_device_catches_a_layer_copy_and_a_mixed_op(monkeypatch):
    """The checks above can fail: a whole-layer host copy is recorded, a mixed-device op raises."""
    down, m, G = _case("full", torch.bfloat16)
    monkeypatch.setattr(OnFake, "watch", down.numel())
    monkeypatch.setattr(OnFake, "copies", [])
    d = on_fake(down)
    d.detach().cpu()
    d.float()
    assert OnFake.copies == [f"cpu(cpu) -> {(E, H, I)} torch.bfloat16", f"float -> {(E, H, I)} torch.float32"]
    with pytest.raises(RuntimeError, match="fake device"):
        d[0].float() @ torch.ones(I, 2)
    with pytest.raises((RuntimeError, AssertionError)):  # allocating on the downs' device needs the (absent) GPU
        torch.zeros(E, I, device=d.device)
