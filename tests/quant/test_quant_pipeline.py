"""`moecompress quantize` end to end on tiny models: plans, refusals, the checkpoint format and both loaders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import build_tiny
from transformers import AutoModelForCausalLM

from moecompress.core.errors import UserError
from moecompress.core.manifest import Manifest
from moecompress.core.writer import dir_bytes
from moecompress.quant.gptq import gptq_quantize, prepare_hessian
from moecompress.quant.layer import GPTQOptions, LayerCapture, expert_group_size, quantize_layer
from moecompress.quant.load import load_quantized
from moecompress.quant.rtn import dequantize
from moecompress.quant.run import run_quantize

KW = dict(samples=4, seq_len=32, batch_size=4, min_tokens=4)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory, tokenizer_dir):
    return build_tiny("qwen3_moe", tmp_path_factory.mktemp("m") / "qwen3", tokenizer_dir)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("bits", [4, 3])
def test_uniform_loads_in_transformers_and_moecompress_identically(qwen, tmp_path, bits):
    out = tmp_path / "q"
    plan = run_quantize(qwen, out, bits=bits, plan="uniform", method="rtn", other_bits=8, **KW)
    assert plan["width_counts"][str(bits)] == sum(len(d["experts"]) for d in plan["layers"].values())
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "pack-quantized" and cfg["quantization_status"] == "compressed"
    assert "lm_head" in cfg["ignore"] and any("gate" in p for p in cfg["ignore"])
    man = Manifest.read(out)
    assert man.layout == "quantized" and man.load_with == "transformers"
    assert man.stage("quantize")["bytes_predicted"] == plan["total_bytes"]
    assert man.bytes_after == dir_bytes(out)
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    assert idx["metadata"]["total_size"] == plan["total_bytes"]  # predicted bytes are the real tensor bytes
    assert "model.layers.0.mlp.experts.3.down_proj.weight_packed" in idx["weight_map"]
    assert "model.layers.0.mlp.gate.weight" in idx["weight_map"]  # router untouched
    ours = load_quantized(out)
    theirs = AutoModelForCausalLM.from_pretrained(out, experts_implementation="eager")
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_logits(ours, ids), _logits(theirs, ids))
    base = AutoModelForCausalLM.from_pretrained(qwen, experts_implementation="eager")
    d = (ours.model.layers[0].mlp.experts.gate_up_proj - base.model.layers[0].mlp.experts.gate_up_proj).abs()
    assert 0 < d.max() < 0.1  # quantized, not garbage


def test_lp_expert_granularity_meets_budget_and_loads_exactly(qwen, tmp_path):
    out = tmp_path / "lp"
    plan = run_quantize(qwen, out, bits=3.0, plan="lp", method="gptq", granularity="expert", other_bits=16, **KW)
    assert plan["routed_bytes"] <= plan["budget_bytes_routed"]
    assert plan["solver"]["status"] == "Optimal"
    # the LP never predicts a worse total error than the uniform 3-bit plan of the same bytes
    uni = sum(r["err"]["3"] * r["importance"] for d in plan["layers"].values() for r in d["experts"])
    assert plan["predicted_cost"] <= uni + 1e-12
    bits = {r["bits"] for d in plan["layers"].values() for r in d["experts"]}
    assert len(bits) > 1  # a real mixed plan on random weights
    saved = json.loads((out / "bit_plan.json").read_text())
    assert saved["layers"] == json.loads(json.dumps(plan["layers"]))
    m = load_quantized(out)
    base = AutoModelForCausalLM.from_pretrained(qwen, experts_implementation="eager")
    # attention kept at 16 bits: identical to the base model
    assert torch.equal(m.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)
    # every expert's loaded weights take at most 2^bits values per group (H=32, I=24: one group size, gcd 8)
    g = expert_group_size(32, 24)
    assert g == 8
    for l, d in plan["layers"].items():
        gu = m.model.layers[int(l)].mlp.experts.gate_up_proj  # [E, 2I, H]
        for r in d["experts"]:
            groups = gu[r["expert"]].reshape(-1, g)  # [2I * H / g, g]
            levels = max(len(torch.unique(row)) for row in groups)
            assert levels <= 2 ** r["gate_up_bits"]


def test_layer_granularity_ties_widths_and_plan_only_writes_only_the_plan(qwen, tmp_path):
    out = tmp_path / "plan"
    plan = run_quantize(qwen, out, bits=2.5, method="rtn", granularity="layer", plan_only=True, **KW)
    for d in plan["layers"].values():
        assert len(d["bits"]) == 1
    assert sorted(p.name for p in out.iterdir()) == ["bit_plan.json"]
    assert plan["average_bits_routed"] <= 2.5 + 1e-9


def test_refusals_write_nothing(qwen, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(UserError, match="supports --bits 2, 3, 4 or 8"):
        run_quantize(qwen, out, bits=5, plan="uniform", **KW)
    with pytest.raises(UserError, match="outside 2..8"):
        run_quantize(qwen, out, bits=1.5, **KW)
    with pytest.raises(UserError, match="below the smallest possible model"):
        run_quantize(qwen, out, budget_gb=1e-6, method="rtn", **KW)
    with pytest.raises(UserError, match="exactly one of"):
        run_quantize(qwen, out, **KW)
    with pytest.raises(UserError, match="other-bits"):
        run_quantize(qwen, out, bits=4, other_bits=5, **KW)
    assert not out.exists()


def test_measured_error_equals_block_output_error(qwen):
    """err[e, b] is exactly the MoE-block output MSE with only expert e quantized (through the real block)."""
    model = AutoModelForCausalLM.from_pretrained(qwen, experts_implementation="eager")
    block = model.model.layers[1].mlp
    experts = block.experts
    x = torch.randn(1, 64, 32, generator=torch.Generator().manual_seed(1))
    E, H, I = experts.down_proj.shape
    cap = LayerCapture(E, H, I)
    from moecompress.core.experts import routed_forward

    def fwd(hidden, idx, w):
        cap.add_batch(hidden, idx, w)
        return routed_forward(experts.gate_up_proj, experts.down_proj, experts.act_fn, hidden, idx, w, cap.observer())

    experts.forward = fwd
    with torch.no_grad():
        ref = block(x)
    del experts.forward
    ref = ref[0] if isinstance(ref, tuple) else ref
    gu, dn = experts.gate_up_proj.detach().clone(), experts.down_proj.detach().clone()
    codes, used, err = quantize_layer(gu, dn, experts.act_fn, (2,), "gptq", cap, 4, torch.float32)  # err [E, 1]
    gq, dq = codes[2].dequantized(torch.float32)
    for e in range(E):
        with torch.no_grad():
            experts.gate_up_proj[e] = gq[e]
            experts.down_proj[e] = dq[e]
            out = block(x)
            out = out[0] if isinstance(out, tuple) else out
            experts.gate_up_proj[e] = gu[e]
            experts.down_proj[e] = dn[e]
        direct = (out - ref).double().pow(2).sum().item() / 64
        assert err[e, 0].item() == pytest.approx(direct, rel=1e-4, abs=1e-12)
    assert int(cap.counts.sum()) == 64 * 2  # top-2
    assert np.all(err.numpy() >= 0) and used.count("gptq") + sum(u.startswith("rtn") for u in used) == E


def _layer_capture(seed=0, E=3, H=32, I=16, T=96):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen)
    idx = torch.stack([torch.randperm(E, generator=gen)[:2] for _ in range(T)])
    w = torch.softmax(torch.randn(T, 2, generator=gen), -1)
    gu = torch.randn(E, 2 * I, H, generator=gen) / H**0.5
    dn = torch.randn(E, H, I, generator=gen) / I**0.5
    cap = LayerCapture(E, H, I, with_down=True)
    cap.add_batch(x, idx, w)
    from moecompress.core.experts import routed_forward

    routed_forward(gu, dn, torch.nn.functional.silu, x, idx, w, cap.observer())
    return cap, gu, dn


def test_sequential_down_hessian_comes_from_quantized_gate_up():
    cap, gu, dn = _layer_capture()
    act = torch.nn.functional.silu
    seq, _, _ = quantize_layer(gu, dn, act, (2, 3), "gptq", cap, 4, torch.float32, opts=GPTQOptions(sequential=True))
    plain, _, _ = quantize_layer(gu, dn, act, (2,), "gptq", cap, 4, torch.float32, opts=GPTQOptions(sequential=False))
    g = expert_group_size(32, 16)
    for b in (2, 3):
        for e in range(3):
            x, p = cap.routed(e)
            gq = dequantize(seq[b].gate_up_q[e], seq[b].gate_up_s[e], g, torch.float32)
            a, u = (x @ gq.T).chunk(2, dim=-1)
            hq = (act(a) * u) * p.unsqueeze(-1)  # outputs of the quantized gate/up, weighted by the router weights
            o = GPTQOptions()
            ph = prepare_hessian(hq.T @ hq, o.damp, keep=o.refine)
            want = gptq_quantize(dn[e], None, b, g, torch.float32, o.damp, prepared=ph, refine=o.refine)
            assert torch.equal(seq[b].down_q[e], want[0]) and torch.equal(seq[b].down_s[e], want[1])
    assert torch.equal(seq[2].gate_up_q, plain[2].gate_up_q)  # gate/up do not depend on the order
    assert not torch.equal(seq[2].down_q, plain[2].down_q)  # the original-weight Hessian gives other codes


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "olmoe", "deepseek_v3"])
def test_every_family_uniform_output_loads_exactly(family, tmp_path, tokenizer_dir):
    src = build_tiny(family, tmp_path / family, tokenizer_dir)
    out = tmp_path / "q"
    run_quantize(src, out, bits=4, plan="uniform", method="rtn", other_bits=8, **KW)
    ours = load_quantized(out)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    theirs = AutoModelForCausalLM.from_pretrained(out, experts_implementation="eager")
    assert torch.equal(_logits(ours, ids), _logits(theirs, ids))
    base = AutoModelForCausalLM.from_pretrained(src, experts_implementation="eager")
    kl = torch.nn.functional.kl_div(
        _logits(ours, ids).log_softmax(-1), _logits(base, ids).log_softmax(-1), log_target=True, reduction="batchmean"
    )
    assert 0 < kl.item() < 0.05


def test_cli_quantize_and_exit_2_on_refusal(qwen, tmp_path):
    from typer.testing import CliRunner

    from moecompress.cli.main import app
    from moecompress.core import loading

    out = tmp_path / "cli"
    args = ["quantize", str(qwen), "--method", "rtn", "--samples", "4", "--seq-len", "32", "--device", "cpu"]
    r = CliRunner().invoke(app, [*args, "--bits", "5", "--plan", "uniform", "-o", str(out)])
    assert r.exit_code == 2 and not out.exists()
    r = CliRunner().invoke(app, [*args, "--bits", "3.5", "--granularity", "expert", "-o", str(out)])
    assert r.exit_code == 0, r.output
    plan = json.loads((out / "bit_plan.json").read_text())
    assert plan["routed_bytes"] <= plan["budget_bytes_routed"] and plan["granularity"] == "expert"
    man = Manifest.read(out)
    assert man.command == "quantize" and man.stage("quantize")["command_line"].startswith("moecompress quantize")
    assert man.load_with == "moecompress.load"  # mixed widths
    m = loading.load(out)
    ref = load_quantized(out)
    ids = torch.randint(0, 300, (1, 8), generator=torch.Generator().manual_seed(2))
    assert torch.equal(_logits(m, ids), _logits(ref, ids))


def test_importance_from_profile_boosts_super_experts():
    from moecompress.quant.plan import _importance

    class Lay:
        moe = [0, 2]
        E = 4

    class Prof:
        super_experts = [(2, 1)]

        def layer(self, l, name):
            return {"routing_mass": torch.tensor([0.1, 0.2, 0.3, 0.4]), "reap": torch.tensor([1.0, 1.0, 2.0, 4.0])}[
                name
            ]

    imp = _importance(Lay(), Prof(), "mass")
    assert imp.shape == (2, 4)
    assert imp[0].tolist() == pytest.approx([0.4, 0.8, 1.2, 1.6])
    assert imp[1, 1] == pytest.approx(0.8 * 100)
    imp = _importance(Lay(), Prof(), "reap")
    assert imp[0].tolist() == pytest.approx([0.5, 0.5, 1.0, 2.0])
    assert _importance(Lay(), None, "uniform").tolist() == [[1.0] * 4] * 2
    with pytest.raises(UserError, match="needs --profile"):
        _importance(Lay(), None, "reap")


def test_budget_gb_plan_fits_the_total_size(qwen, tmp_path):
    ref = run_quantize(qwen, tmp_path / "u3", bits=3, plan="uniform", method="rtn", other_bits=8, plan_only=True, **KW)
    budget = (ref["total_bytes"] + 2000) / 1e9
    kw = dict(method="rtn", granularity="expert", plan_only=True, **KW)
    plan = run_quantize(qwen, tmp_path / "g", budget_gb=budget, **kw)
    assert plan["total_bytes"] <= budget * 1e9
    assert plan["average_bits_routed"] > 2.5  # it spends the budget rather than dropping everything to 2 bits
    assert plan["fixed_bytes"] == ref["fixed_bytes"]  # attention etc. at --other-bits 8 in both


@pytest.mark.parametrize("method,cache", [("gptq", 0), ("gptq", 2**30), ("rtn", 0)])
def test_lp_write_pass_gives_each_expert_the_codes_of_its_width(qwen, tmp_path, method, cache):
    """The LP plan's write pass (after the measuring pass) sees the same inputs: every expert's written weights are
    those of the one-pass uniform output at the expert's planned width, whether the write pass quantizes again
    (``max_cache_bytes=0``) or reuses the measured codes."""
    kw = dict(method=method, other_bits=16, opts=GPTQOptions(propagate=False), **KW)
    lp = run_quantize(qwen, tmp_path / "lp", bits=3.0, plan="lp", granularity="expert", max_cache_bytes=cache, **kw)
    assert Manifest.read(tmp_path / "lp").stage("quantize")["passes"] == "measure + quantize"
    rows = [r for d in lp["layers"].values() for r in d["experts"]]
    assert len({r["bits"] for r in rows}) > 1
    mixed = load_quantized(tmp_path / "lp").state_dict()
    uniform = {}
    for b in {r["gate_up_bits"] for r in rows} | {r["down_bits"] for r in rows}:
        run_quantize(qwen, tmp_path / f"u{b}", bits=b, plan="uniform", **kw)
        uniform[b] = load_quantized(tmp_path / f"u{b}").state_dict()
    for l, d in lp["layers"].items():
        for name, which in (("gate_up_proj", "gate_up_bits"), ("down_proj", "down_bits")):
            k = f"model.layers.{l}.mlp.experts.{name}"
            for r in d["experts"]:
                if name == "down_proj" and method == "gptq" and r["gate_up_bits"] != r["down_bits"]:
                    continue  # GPTQ's down_proj is fitted to the gate/up of its own option (sequential)
                assert torch.equal(mixed[k][r["expert"]], uniform[r[which]][k][r["expert"]]), (k, r)


def test_hessians_weight_routed_tokens_by_router_weight_squared():
    cap, gu, dn = _layer_capture(seed=4)
    plain = LayerCapture(3, 32, 16, weighted=False)
    x, idx, w = cap.batches[0]
    plain.add_batch(x, idx, w)
    from moecompress.core.experts import routed_forward

    routed_forward(gu, dn, torch.nn.functional.silu, x, idx, w, plain.observer())
    h_w, _ = cap.hessians(range(3))
    h_p, _ = plain.hessians(range(3))
    for e in range(3):
        xe, pe = cap.routed(e)
        torch.testing.assert_close(h_w[e], (xe * pe[:, None]).T @ (xe * pe[:, None]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(h_p[e], xe.T @ xe, rtol=1e-5, atol=1e-5)


def test_propagated_write_pass_feeds_quantized_layers_forward(qwen, tmp_path):
    """With propagation the first MoE layer's codes are those of the one-pass run; later layers see the quantized
    earlier layers' outputs (other Hessians, other codes), and the manifest says so."""
    kw = dict(bits=2, plan="uniform", method="gptq", other_bits=16, **KW)
    run_quantize(qwen, tmp_path / "a", opts=GPTQOptions(propagate=False), **kw)
    run_quantize(qwen, tmp_path / "b", opts=GPTQOptions(propagate=True), **kw)
    assert Manifest.read(tmp_path / "b").stage("quantize")["propagate_quantized"] is True
    assert Manifest.read(tmp_path / "a").stage("quantize")["propagate_quantized"] is False
    sa, sb = load_quantized(tmp_path / "a").state_dict(), load_quantized(tmp_path / "b").state_dict()
    k0, k1 = "model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.gate_up_proj"
    assert torch.equal(sa[k0], sb[k0])
    assert not torch.equal(sa[k1], sb[k1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gptq_and_hessians_run_on_the_device_and_match_cpu():
    cap, gu, dn = _layer_capture(seed=3)
    dev = LayerCapture(3, 32, 16, device=torch.device("cuda"), with_down=False)
    for x, idx, w in cap.batches:
        dev.add_batch(x, idx, w)
        from moecompress.core.experts import routed_forward

        routed_forward(gu.cuda(), dn.cuda(), torch.nn.functional.silu, x.cuda(), idx.cuda(), w.cuda(), dev.observer())
    h_dev, h_cpu = dev.hessians(range(3))[0], cap.hessians(range(3))[0]
    assert h_dev.is_cuda
    torch.testing.assert_close(h_dev.cpu(), h_cpu, rtol=1e-4, atol=1e-3)
    act = torch.nn.functional.silu
    a, _, ea = quantize_layer(gu, dn, act, (4,), "gptq", cap, 4, torch.float32)
    b, _, eb = quantize_layer(gu.cuda(), dn.cuda(), act, (4,), "gptq", dev, 4, torch.float32)
    assert (a[4].gate_up_q != b[4].gate_up_q).float().mean() < 0.01  # same codes up to float rounding ties
    torch.testing.assert_close(ea, eb, rtol=0.1, atol=1e-6)
