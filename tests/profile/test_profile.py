"""Every profile statistic equals a brute-force computation on the full transformers model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny
from moecompress.calibration.sets import calibration_set, load_tokenizer
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from moecompress.core.checkpoint import Checkpoint
from moecompress.core.errors import UserError
from moecompress.profile.run import Profile, collect, json_safe, run_profile
from moecompress.profile.stats import super_experts


def brute_force(path, input_ids, domains):
    """Full model forward; per token and per chosen expert, plain tensor ops."""
    ck = Checkpoint(path)
    fam = ck.family
    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="eager").eval()
    seen = {}
    hooks = []
    for l in ck.moe_layers:
        block = getattr(model.model.layers[l], fam.module_block)
        ex = getattr(block, fam.experts)

        def grab(mod, args, _l=l):
            seen.setdefault(_l, []).append((args[0].detach(), args[1].detach(), args[2].detach()))

        hooks.append(ex.register_forward_pre_hook(grab))
    with torch.no_grad():
        for row in input_ids:
            model(input_ids=row[None])
    for h in hooks:
        h.remove()
    doms = sorted(set(domains))
    out = {}
    for l in ck.moe_layers:
        w = ck.moe_weights(l)
        E, I, H = w.gate.shape
        act = getattr(getattr(model.model.layers[l], fam.module_block), fam.experts).act_fn
        r = dict(
            tokens=torch.zeros(E),
            mass=torch.zeros(E, dtype=torch.float64),
            reap=torch.zeros(E, dtype=torch.float64),
            max_abs=torch.zeros(E, dtype=torch.float64),
            sq=torch.zeros(E, I, dtype=torch.float64),
            dom=torch.zeros(len(doms), E),
        )
        for row_i, (hid, idx, wts) in enumerate(seen[l]):
            d = doms.index(domains[row_i])
            for t in range(hid.shape[0]):
                p = wts[t].double() / wts[t].double().sum()
                for j in range(idx.shape[1]):
                    e = int(idx[t, j])
                    x = hid[t].float()
                    h = act(w.gate[e].float() @ x) * (w.up[e].float() @ x)
                    f = w.down[e].float() @ h
                    r["tokens"][e] += 1
                    r["mass"][e] += p[j]
                    r["reap"][e] += p[j] * f.double().norm()
                    r["max_abs"][e] = max(r["max_abs"][e], f.double().abs().max())
                    r["sq"][e] += h.double() ** 2
                    r["dom"][d, e] += 1
        n = r["tokens"].clamp_min(1)
        out[l] = dict(
            tokens=r["tokens"],
            routing_mass=r["mass"] / r["mass"].sum(),
            reap=r["reap"] / n,
            max_abs_out=r["max_abs"],
            channel_sq_mean=r["sq"] / n[:, None].double(),
            domain_counts=r["dom"],
        )
    return out


def test_streamed_profile_equals_brute_force(tiny_model):
    ck = Checkpoint(tiny_model)
    tokens = calibration_set(load_tokenizer(tiny_model), "mixed", samples=4, seq_len=16, seed=3)
    stats = collect(ck, tokens, batch_size=3)
    ref = brute_force(tiny_model, tokens.input_ids, tokens.domains)
    T, k = tokens.num_tokens, ck.top_k
    assert sorted(stats) == ck.moe_layers
    for l in ck.moe_layers:
        s, r = stats[l], ref[l]
        assert int(s["tokens"].sum()) == k * T
        assert torch.equal(s["tokens"].double(), r["tokens"].double())
        assert torch.allclose(s["frequency"], r["tokens"].double() / (k * T))
        for name in ("routing_mass", "reap", "max_abs_out", "channel_sq_mean"):
            assert torch.allclose(s[name], r[name], rtol=1e-4, atol=1e-7), (l, name)
        assert torch.equal(s["domain_counts"].double(), r["domain_counts"].double())
        sim = s["output_similarity"]
        assert torch.allclose(sim.diagonal(), torch.ones(ck.num_experts, dtype=sim.dtype), atol=1e-6)
        assert torch.allclose(sim, sim.T, atol=1e-9)


def test_profile_files(tmp_path, tokenizer_dir):
    path = build_tiny("qwen3_moe", tmp_path / "m", tokenizer_dir)
    run_profile(path, tmp_path / "run", samples=4, seq_len=16, batch_size=2)
    meta = json.loads((tmp_path / "run" / "profile.json").read_text())
    for key in ("model", "family", "top_k", "tokens", "moe_layers", "experts", "super_experts", "calibration"):
        assert key in meta
    assert meta["tokens"] == 64 and meta["family"] == "Qwen3-MoE"
    for l in meta["moe_layers"]:
        assert sum(e["tokens"] for e in meta["experts"] if e["layer"] == l) == meta["top_k"] * meta["tokens"]
    prof = Profile.load(tmp_path / "run")
    assert prof.layer(0, "channel_sq_mean").shape == (6, 24)
    assert set(meta["domains"]) == {"austen", "bible", "python", "shakespeare"}
    prof.check_model(Checkpoint(path))


def test_low_token_experts_are_flagged(tmp_path, tokenizer_dir):
    path = build_tiny("qwen3_moe", tmp_path / "m", tokenizer_dir)
    counts = sorted(e["tokens"] for e in run_profile(path, tmp_path / "a", samples=2, seq_len=16).meta["experts"])
    limit = counts[len(counts) // 3] + 1
    prof = run_profile(path, tmp_path / "b", samples=2, seq_len=16, min_tokens=limit)
    flagged = [(e["layer"], e["expert"]) for e in prof.meta["experts"] if e["low_tokens"]]
    assert flagged == [(e["layer"], e["expert"]) for e in prof.meta["experts"] if e["tokens"] < limit]
    assert 0 < len(flagged) < len(counts) and len(prof.meta["warnings"]) == len(flagged)
    assert prof.meta["min_tokens"] == limit


def test_planted_super_expert_is_detected(tmp_path, tokenizer_dir):
    path = build_tiny("qwen3_moe", tmp_path / "m", tokenizer_dir, num_hidden_layers=4)
    clean = run_profile(path, tmp_path / "clean", samples=4, seq_len=16)
    assert clean.meta["super_experts"] == []
    sd = load_file(str(path / "model.safetensors"))
    sd["model.layers.1.mlp.experts.2.down_proj.weight"][7] *= 400.0  # one massive output channel
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    prof = run_profile(path, tmp_path / "run", samples=4, seq_len=16)
    assert prof.meta["super_experts"] == [[1, 2]]
    e = next(e for e in prof.meta["experts"] if e["layer"] == 1 and e["expert"] == 2)
    assert e["super"] and e["max_abs_channel"] == 7


def test_super_rule_thresholds():
    pool = {(l, e): 1.0 + 0.01 * e for l in range(3) for e in range(20)}
    assert super_experts(pool, 4)[0] == []  # nothing stands out: the magnitude guard holds
    pool[(0, 4)] = 500.0
    pool[(3, 1)] = 900.0  # layer 3 >= round(0.75 * 4): outside the pool
    chosen, rule = super_experts(pool, 4)
    assert chosen == [(0, 4)] and rule["pool_layers_below"] == 3


@pytest.mark.parametrize("samples", [3])
def test_spilled_cache_equals_memory_cache(tmp_path, tokenizer_dir, samples):
    from moecompress.core.stream import LayerStream

    path = build_tiny("olmoe", tmp_path / "m", tokenizer_dir)
    ck = Checkpoint(path)
    ids = calibration_set(load_tokenizer(path), "bible", samples, 16).input_ids
    outs = []
    for spill in (False, True):
        ls = LayerStream(ck, ids, batch_size=2, spill=spill)
        for _, layer in ls.layers():
            ls.forward_layer(layer)
        outs.append(torch.cat([ls.logits(i) for i in range(len(ls.cache))]))
        ls.close()
    full = AutoModelForCausalLM.from_pretrained(path, experts_implementation="eager").eval()
    with torch.no_grad():
        ref = full(input_ids=ids).logits
    assert torch.equal(outs[0], outs[1])
    assert torch.allclose(outs[0], ref, atol=1e-5)


def test_json_safe_replaces_every_non_finite_number():
    meta = {"a": float("nan"), "b": [1.0, float("inf"), {"c": -float("inf")}], "d": "nan", "e": 2}
    clean, where = json_safe(meta)
    assert clean == {"a": None, "b": [1.0, None, {"c": None}], "d": "nan", "e": 2}
    assert where == ["a", "b[1]", "b[2].c"]
    json.dumps(clean, allow_nan=False)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1, 2]", "holds a JSON list"),
        ('{"moe_layers": "all"}', "field moe_layers is 'all'"),
        ('{"moe_layers": [0], "super_experts": [[0]]}', "field super_experts"),
        ('{"moe_layers": [0], "num_experts": 1e400}', "field num_experts"),
        ("[" * 50_000 + "]" * 50_000, "nested too deeply"),
        ("{}", "has no moe_layers"),
    ],
)
def test_malformed_profile_json_is_one_user_error(tmp_path, text, message):
    (tmp_path / "profile.json").write_text(text)
    with pytest.raises(UserError, match=message):
        Profile.load(tmp_path)


@pytest.mark.gpu
def test_profile_statistics_on_cuda_equal_the_cpu_ones(tiny_model):
    """The sums stay on the GPU during the pass (no per-expert host sync) and come back to the CPU in finalize."""
    ck = Checkpoint(tiny_model)
    tokens = calibration_set(load_tokenizer(tiny_model), "mixed", samples=4, seq_len=16, seed=3)
    cpu = collect(ck, tokens, batch_size=3)
    gpu = collect(ck, tokens, batch_size=3, device=torch.device("cuda"))
    for l in ck.moe_layers:
        for name, ref in cpu[l].items():
            got = gpu[l][name]
            assert got.device.type == "cpu", name
            if name == "max_abs_channel":  # a near-tie may pick another channel under GPU rounding
                continue
            if ref.dtype == torch.long:
                assert torch.equal(got, ref), (l, name)
            else:
                assert torch.allclose(got, ref, rtol=1e-4, atol=1e-6), (l, name)
