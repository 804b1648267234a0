"""Atomic pruning with the layers held in the checkpoint's dtype: a bf16 checkpoint's routed experts stay bf16
through the gradient pass (forward and backward) and the pruning pass, and every score, kept channel and written
tensor equals the run on the same checkpoint stored in float32 (its outputs rounded to bf16): bf16 -> float32 is
exact, and weights are upcast one expert at a time where read."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import build_tiny
from safetensors.torch import load_file, save_file

from moecompress.atomic import run as ap
from moecompress.atomic.gradstream import _NarrowKernel, _UpcastLinear, g_chunk, routed_layer_bytes, streamed_grad_stats
from moecompress.atomic.heapr import heapr_scores
from moecompress.atomic.transform import AtomTransform
from moecompress.core.checkpoint import Checkpoint


def as_float32(src, dst):
    """The same checkpoint with every floating tensor stored in float32 (the same values)."""
    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        tensors = load_file(f)
        save_file({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}, f, {"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["dtype"] = "float32"
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def written(folder):
    """(the kept channels, every written tensor) of an atomic-prune output."""
    tensors = {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}
    return json.loads((folder / "atomic_channels.json").read_text()), tensors


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tokenizer_dir):
    d = tmp_path_factory.mktemp("narrow-atom")
    bf = build_tiny("qwen3_moe", d / "bf16", tokenizer_dir, dtype=torch.bfloat16)
    return bf, as_float32(bf, d / "f32")


def test_upcast_linear_is_the_float32_linear_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(40, 24, generator=gen).bfloat16()  # [out, in] held narrow
    x = torch.randn(37, 24, generator=gen)
    g = torch.randn(37, 40, generator=gen)
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = torch.nn.functional.linear(a, w.float()), _UpcastLinear.apply(b, w)
    ya.backward(g)
    yb.backward(g)
    assert torch.equal(ya, yb) and torch.equal(a.grad, b.grad)


def test_gradient_pass_holds_bf16_experts_and_scores_as_float32(pair):
    ids = torch.randint(0, 320, (4, 16), generator=torch.Generator().manual_seed(0))
    held: list[torch.dtype] = []

    def score(l, st, experts):
        held.append(experts.gate_up_proj.dtype)
        return heapr_scores(st.m, experts.down_proj.detach(), st.G), st.counts, st.m

    runs = {
        (p.name, c): streamed_grad_stats(Checkpoint(p), ids, "full", batch_size=2, with_moments=True, on_layer=score,
                                         chunk=c)
        for p in pair for c in (None, 3)
    }  # fmt: skip
    L = len(Checkpoint(pair[0]).moe_layers)
    assert held == [torch.bfloat16] * 2 * L + [torch.float32] * 2 * L
    ref = runs[("f32", None)]
    for key, run in runs.items():
        for l in ref:
            for a, b in zip(ref[l], run[l], strict=True):
                assert torch.equal(a, b), (key, l)
            assert ref[l][0].abs().sum() > 0


def test_g_is_chunked_to_a_quarter_of_a_layer(pair):
    ck = Checkpoint(pair[0])
    per = 4 * ck.config.hidden_size**2
    assert routed_layer_bytes(ck) > 0
    assert g_chunk(ck) == max(1, min(ck.num_experts, routed_layer_bytes(ck) // 4 // per))
    assert routed_layer_bytes(Checkpoint(pair[1])) == 2 * routed_layer_bytes(ck)  # float32 vs bf16 bytes


@pytest.mark.parametrize("layout", ["uniform", pytest.param("exact", marks=pytest.mark.slow)])
def test_atom_of_a_bf16_checkpoint_equals_its_float32_copy(pair, tmp_path, monkeypatch, layout):
    held: list[torch.dtype] = []
    moe_layer = AtomTransform.moe_layer

    def spy(self, ctx):
        held.append(ctx.experts.gate_up_proj.dtype)
        moe_layer(self, ctx)

    monkeypatch.setattr(AtomTransform, "moe_layer", spy)
    mans = {
        p.name: ap.atomic_prune(p, tmp_path / p.name, 0.25, layout=layout, samples=4, seq_len=32, batch_size=2)
        for p in pair
    }
    L = len(Checkpoint(pair[0]).moe_layers)
    assert held == [torch.bfloat16] * L + [torch.float32] * L
    assert mans["bf16"]["compensation_output_error"] == mans["f32"]["compensation_output_error"]
    (ch_bf, t_bf), (ch_32, t_32) = written(tmp_path / "bf16"), written(tmp_path / "f32")
    assert ch_bf == ch_32
    assert sorted(t_bf) == sorted(t_32)
    for k, t in t_bf.items():
        assert t.dtype == torch.bfloat16 and t_32[k].dtype == torch.float32, k
        assert torch.equal(t, t_32[k].to(torch.bfloat16)), k


def test_the_backward_recomputes_each_experts_terms_with_the_same_gradients():
    """routed_forward(recompute=True), the gradient pass's narrow path: autograd keeps no expert intermediate
    (saved tensors are the inputs and routing only) and every gradient is bit for bit the kept-graph one."""
    from moecompress.core.experts import routed_forward

    gen = torch.Generator().manual_seed(0)
    E, I, H, T, k = 6, 24, 16, 40, 2
    gate_up = torch.randn(E, 2 * I, H, generator=gen).bfloat16()
    down = torch.randn(E, H, I, generator=gen).bfloat16()
    x0, logits = torch.randn(T, H, generator=gen), torch.randn(T, E, generator=gen)
    idx = logits.topk(k, dim=-1).indices
    experts = torch.nn.Module()
    experts.act_fn = torch.nn.SiLU()
    kernel = _NarrowKernel(experts)
    grads, saved = [], []
    for recompute in (False, True):
        x = x0.clone().requires_grad_(True)
        w = torch.softmax(x @ torch.ones(H, E) * 0.1 + logits, -1).gather(1, idx)  # weights depend on x too
        kept: dict[int, int] = {}  # float storages autograd keeps (each once)

        def pack(t, kept=kept):
            if t.dtype == torch.float32:
                kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = routed_forward(gate_up, down, kernel, x, idx, w, recompute=recompute)
        y.backward(torch.ones_like(y))
        grads.append(x.grad)
        saved.append(sum(kept.values()))
    assert torch.equal(grads[0], grads[1]) and grads[0].abs().sum() > 0
    # kept graph: per expert [n, 2I] + act [n, I] + f [n, H] + f w [n, H] floats; recomputed: x and the weights
    assert saved[1] == x0.numel() * 4 + w.numel() * 4 and saved[0] > 5 * saved[1], saved
    with pytest.raises(ValueError, match="observe"):
        routed_forward(gate_up, down, kernel, x0, idx, w.detach(), observe=lambda *a: None, recompute=True)


def test_attention_held_bf16_in_the_backward_gives_the_same_statistics(pair, monkeypatch):
    """The gradient pass holds a bf16 checkpoint's attention projections in bf16 in its backward (upcast where
    used): G, counts and m equal the pass with them in float32 bit for bit; a weight that is no bf16 value stays."""
    from moecompress.atomic import gradstream as gs

    ids = torch.randint(0, 320, (4, 16), generator=torch.Generator().manual_seed(0))
    ck = Checkpoint(pair[0])
    changed: list[int] = []
    narrow = gs._narrow_attention

    def spy(layer):
        done = narrow(layer)
        changed.append(len(done))
        assert all(m.weight.dtype == torch.bfloat16 for m in done)
        return done

    monkeypatch.setattr(gs, "_narrow_attention", spy)
    held = streamed_grad_stats(ck, ids, "full", batch_size=2, with_moments=True)
    assert changed and all(n >= 4 for n in changed)  # q, k, v, o of every layer
    monkeypatch.setattr(gs, "_narrow_attention", lambda layer: [])
    wide = streamed_grad_stats(ck, ids, "full", batch_size=2, with_moments=True)
    assert sorted(held) == sorted(wide) == ck.moe_layers
    for l in wide:
        assert torch.equal(held[l].G, wide[l].G) and held[l].G.abs().sum() > 0, l
        assert torch.equal(held[l].counts, wide[l].counts) and torch.equal(held[l].m, wide[l].m), l

    lin = torch.nn.Linear(8, 4, bias=False)
    lin.weight.data = torch.randn(4, 8).bfloat16().float()
    lin.weight.data[0, 0] += 1e-4  # no longer a bf16 value
    layer = torch.nn.Module()
    layer.self_attn = torch.nn.Module()
    layer.self_attn.o_proj = lin
    assert narrow(layer) == [] and lin.weight.dtype == torch.float32


def test_recomputed_attention_gives_the_same_statistics(pair, monkeypatch):
    """Past RECOMPUTE_ATTENTION_BYTES the backward recomputes each layer's attention (activation checkpointing):
    G, counts and m equal the pass that keeps the attention's intermediates, bit for bit."""
    from moecompress.atomic import gradstream as gs

    ids = torch.randint(0, 320, (4, 16), generator=torch.Generator().manual_seed(2))
    ck = Checkpoint(pair[0])
    calls: list[int] = []
    checkpoint = torch.utils.checkpoint.checkpoint

    def spy(*args, **kwargs):
        calls.append(1)
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", spy)
    runs = {}
    for cap in (0, 1 << 40):
        monkeypatch.setattr(gs, "RECOMPUTE_ATTENTION_BYTES", cap)
        calls.clear()
        runs[cap] = streamed_grad_stats(ck, ids, "full", batch_size=2, with_moments=True)
        n_layers = ck.config.num_hidden_layers
        assert len(calls) >= (2 * n_layers if cap == 0 else 0)  # 2 batches per layer
        if cap:
            assert not calls
    on, off = runs[0], runs[1 << 40]
    assert sorted(on) == sorted(off) == ck.moe_layers
    for l in off:
        assert torch.equal(on[l].G, off[l].G) and on[l].G.abs().sum() > 0, l
        assert torch.equal(on[l].counts, off[l].counts) and torch.equal(on[l].m, off[l].m), l
