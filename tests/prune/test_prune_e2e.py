"""Expert pruning end to end on every family: write, reload with transformers, compare with pruning in memory."""

import json

import pytest
import torch
from conftest import build_tiny, reload_clean
from moecompress.calibration.sets import TokenSet
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from moecompress.cli.main import app
from moecompress.core import loading
from moecompress.core.checkpoint import Checkpoint
from moecompress.core.manifest import Manifest
from moecompress.merge.run import DTYPE_BYTES
from moecompress.profile.run import build_profile, collect, save_profile
from moecompress.prune.load import load_per_layer, prune_in_memory
from moecompress.prune.run import prune_model as _prune_model
from moecompress.prune.transform import PruneOptions


def _flat(man):
    """A one-stage manifest as one dict: its common fields and its prune section (moecompress.json schema 2)."""
    assert [s["op"] for s in man.stages] == ["prune"]
    return {**man.to_dict(), **man.stage("prune")}


def prune_model(*args, **kw):
    """``prune.run.prune_model``; the manifest it returns equals the moecompress.json it wrote."""
    man = _prune_model(*args, **kw)
    assert Manifest.read(args[1]) == man
    return _flat(man)


def _tokens(n=4, s=16, vocab=320):
    ids = torch.randint(0, vocab, (n, s), generator=torch.Generator().manual_seed(0))
    return TokenSet(ids, ["a", "a", "b", "b"][:n], "random", 0)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _tensor_bytes(ckpt, keys):
    info = ckpt.tensor_info()
    total = 0
    for k in keys:
        n = 1
        for s in info[k]["shape"]:
            n *= s
        total += n * DTYPE_BYTES[info[k]["dtype"]]
    return total


def _profile_dir(path, folder, tokens, edit=None):
    """A profile run of ``path``; ``edit(meta, tensors)`` may plant super experts or skew scores."""
    ck = Checkpoint(path)
    prof = build_profile(ck, tokens, collect(ck, tokens, batch_size=2), 0.0)
    if edit is not None:
        edit(prof.meta, prof.tensors)
    save_profile(prof, folder)
    return folder


def test_prune_every_family_reloads_equal_to_in_memory_pruning(tiny_model, tmp_path):
    out = tmp_path / "out"
    man = prune_model(tiny_model, out, PruneOptions(ratio=0.34, method="reap"), tokens=_tokens())
    src = Checkpoint(tiny_model)
    fam, E = src.family, src.num_experts
    cfg = json.loads((out / "config.json").read_text())
    n = 4 if fam.n_group(src.config) > 1 else 2  # DeepSeek: 3 of 8 rounded to 2 per group
    assert all(cfg[k] == E - n for k in fam.count_keys)
    assert cfg["architectures"] == json.loads((tiny_model / "config.json").read_text())["architectures"]

    # kept map = the profile's REAP ranking (written into OUT/profile), experts renumbered 0..k-1 in order
    prof = json.loads((out / "profile" / "profile.json").read_text())
    for l in src.moe_layers:
        reap = {r["expert"]: r["reap"] for r in prof["experts"] if r["layer"] == l}
        info = man["layers"][str(l)]
        if fam.n_group(src.config) > 1:
            Eg = E // 2
            want = sorted(e for g in range(2) for e in sorted(range(g * Eg, (g + 1) * Eg), key=reap.get)[n // 2 :])
        else:
            want = sorted(sorted(reap, key=reap.get)[n:])
        assert info["kept"] == want
        assert info["old_to_new"] == {str(e): i for i, e in enumerate(want)}

    pruned = reload_clean(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, experts_implementation="eager").eval()
    ref = prune_in_memory(base, {l: man["layers"][str(l)]["kept"] for l in src.moe_layers})
    ids = _tokens().input_ids
    got = _logits(pruned, ids)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, _logits(ref, ids), rtol=0, atol=0)

    # size: exactly the removed experts' tensors and router rows are gone
    removed_keys = [
        fam.expert_key(l, e, p) for l in src.moe_layers for e in man["layers"][str(l)]["removed"] for p in range(3)
    ]
    router_keys = [k for l in src.moe_layers for k in src.keys() if k.startswith(fam.router_key(l, ""))]
    router_bytes = _tensor_bytes(src, router_keys)
    expected = _tensor_bytes(src, src.keys()) - _tensor_bytes(src, removed_keys) - router_bytes * n // E
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == expected
    assert man["bytes_after"] < man["bytes_before"] and man["params_after"] < man["params_before"]
    assert man["source_fingerprint"] == src.fingerprint and man["calibration_fingerprint"] == _tokens().fingerprint
    if fam.shared:
        assert {p["module"] for p in man["protected_why"] if p["why"] == "shared"} == {fam.shared}


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_protected_super_experts_survive(family, tmp_path, tokenizer_dir):
    path = build_tiny(family, tmp_path / family, tokenizer_dir)
    ck = Checkpoint(path)
    l = ck.moe_layers[0]
    holder = {}

    def plant(meta, tensors):  # the weakest expert of layer l becomes a super expert
        weakest = int(tensors[f"layer{l}.reap"].argmin())
        holder["e"] = weakest
        meta["super_experts"] = [[l, weakest]]

    prof = _profile_dir(path, tmp_path / "prof", _tokens(), plant)
    man = prune_model(path, tmp_path / "out", PruneOptions(ratio=0.5, method="reap"), profile_dir=prof)
    assert holder["e"] in man["layers"][str(l)]["kept"]
    assert man["protected"] == [[l, holder["e"]]]
    assert {"layer": l, "expert": holder["e"], "why": "super"} in man["protected_why"]
    man2 = prune_model(
        path, tmp_path / "out2", PruneOptions(ratio=0.5, method="reap", protect_super=False), profile_dir=prof
    )
    assert holder["e"] not in man2["layers"][str(l)]["kept"] and man2["protected"] == []


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_per_layer_layout_round_trips_exactly(family, tmp_path, tokenizer_dir):
    path = build_tiny(family, tmp_path / family, tokenizer_dir)
    ck = Checkpoint(path)
    first = ck.moe_layers[0]

    def skew(meta, tensors):  # the first MoE layer's experts look nearly useless but one -> it loses the most
        r = tensors[f"layer{first}.reap"]
        tensors[f"layer{first}.reap"] = torch.where(r == r.max(), r, r * 1e-3)

    prof = _profile_dir(path, tmp_path / "prof", _tokens(), skew)
    out = tmp_path / "out"
    man = prune_model(path, out, PruneOptions(ratio=0.25, method="reap", layout="per-layer"), profile_dir=prof)
    counts = {int(l): v["num_experts"] for l, v in man["layers"].items()}
    assert len(set(counts.values())) > 1, counts
    E = ck.num_experts
    assert sum(E - c for c in counts.values()) == man["experts_removed_total"]
    assert man["layout"] == "per-layer"
    model = loading.load(out)
    assert isinstance(model, type(load_per_layer(out)))
    base = AutoModelForCausalLM.from_pretrained(path, experts_implementation="eager").eval()
    ref = prune_in_memory(base, {int(l): v["kept"] for l, v in man["layers"].items()})
    ids = _tokens().input_ids
    torch.testing.assert_close(_logits(model, ids), _logits(ref, ids), rtol=0, atol=0)
    fam = ck.family
    for l, c in counts.items():
        block = getattr(model.model.layers[l], fam.module_block)
        assert getattr(block, fam.experts).gate_up_proj.shape[0] == c == getattr(block, fam.router).weight.shape[0]

    # an output of an earlier moecompress (schema 1: the prune fields at the top level) loads the same
    flat = {k: v for k, v in man.items() if k not in ("schema", "op", "stages")}
    (out / "moecompress.json").write_text(json.dumps(flat))
    torch.testing.assert_close(_logits(loading.load(out), ids), _logits(ref, ids), rtol=0, atol=0)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_output_error_method_writes_a_loadable_model(family, tmp_path, tokenizer_dir):
    path = build_tiny(family, tmp_path / "m", tokenizer_dir)
    man = prune_model(path, tmp_path / "out", PruneOptions(ratio=0.34, method="output-error"), tokens=_tokens())
    E = Checkpoint(path).num_experts
    for info in man["layers"].values():
        assert len(info["kept"]) == (E - 2 if family == "mixtral" else E - 4)
        assert all(c >= 0 or abs(c) < 1e-6 for c in info["removal_costs"][:1])
    assert man["output_error_inputs"] == "pruned earlier layers (sequential)"
    assert torch.isfinite(_logits(reload_clean(tmp_path / "out"), _tokens().input_ids)).all()


def _cli(*args):
    return CliRunner().invoke(app, ["prune", *map(str, args)])


def test_cli_refusals_exit_2_and_write_nothing(tmp_path, tokenizer_dir):
    path = build_tiny("qwen3_moe", tmp_path / "q", tokenizer_dir)
    ds = build_tiny("deepseek_v3", tmp_path / "ds", tokenizer_dir)
    other = build_tiny("qwen3_moe", tmp_path / "q2", tokenizer_dir, num_experts=8)
    prof = _profile_dir(other, tmp_path / "prof-other", _tokens())
    (tmp_path / "exists").mkdir()
    cases = [
        ([path, "--ratio", "0"], "between 0 and 1"),
        ([path, "--ratio", "1"], "between 0 and 1"),
        ([path, "--ratio", "0.9"], "fewer than top-k"),
        ([ds, "--ratio", "0.7"], "router's minimum"),
        ([path, "--ratio", "0.5", "--method", "magic"], "not one of"),
        ([path, "--ratio", "0.5", "--refit", "magic"], "--refit 'magic' is not one of none, router, down"),
        ([path, "--ratio", "0.5", "--layout", "exact"], "granularity atom"),
        ([path, "--ratio", "0.5", "-o", path / "inside"], "inside"),
        ([path, "--ratio", "0.5", "-o", tmp_path / "exists"], "already exists"),
        ([path, "--ratio", "0.5", "--profile", prof], "another model"),
    ]
    for args, msg in cases:
        out = args[args.index("-o") + 1] if "-o" in args else tmp_path / "never"
        r = _cli(*args, *([] if "-o" in args else ["-o", out]))
        assert r.exit_code == 2, (args, r.output)
        assert msg in r.output.replace("\n", " "), (msg, r.output)
        assert not (tmp_path / "never").exists() and not (path / "inside").exists()
        assert list((tmp_path / "exists").iterdir()) == []


def test_cli_prunes_with_profile_and_reports_protection(tmp_path, tokenizer_dir):
    path = build_tiny("qwen2_moe", tmp_path / "q", tokenizer_dir)
    prof = _profile_dir(path, tmp_path / "prof", _tokens())
    r = _cli(path, "--ratio", "0.34", "--method", "frequency", "--profile", prof, "-o", tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert "shared experts (shared_expert) are never pruned" in r.output.replace("\n", " ")
    man = _flat(Manifest.read(tmp_path / "out"))
    assert man["method"] == "frequency" and man["experts_after"] == 4 and man["tool"] == "moecompress"
    assert man["profile"] == str(prof.resolve())
    freq = load_file(str(prof / "profile.safetensors"))
    for l, info in man["layers"].items():
        assert info["removed"] == sorted(freq[f"layer{l}.frequency"].sort(stable=True).indices[:2].tolist())


def test_output_error_per_layer_grouped_round_trips(tmp_path, tokenizer_dir):
    path = build_tiny("deepseek_v3", tmp_path / "ds", tokenizer_dir)
    out = tmp_path / "out"
    opts = PruneOptions(ratio=0.5, method="output-error", layout="per-layer", refit="none")
    man = prune_model(path, out, opts, tokens=_tokens())
    counts = [v["num_experts"] for v in man["layers"].values()]
    assert sum(8 - c for c in counts) == 4 * len(counts) and all(c % 2 == 0 and c >= 4 for c in counts)
    for info in man["layers"].values():  # every removal round takes one expert from each group of 4
        assert all(sorted(e // 4 for e in step) == [0, 1] for step in info["removal_order"])
    base = AutoModelForCausalLM.from_pretrained(path, experts_implementation="eager").eval()
    ref = prune_in_memory(base, {int(l): v["kept"] for l, v in man["layers"].items()})
    ids = _tokens().input_ids
    torch.testing.assert_close(_logits(loading.load(out), ids), _logits(ref, ids), rtol=0, atol=0)


def test_cli_atom_granularity_dispatches_to_atomic_prune(tmp_path, tokenizer_dir):
    from moecompress.calibration.sets import calibration_set, load_tokenizer

    path = build_tiny("qwen3_moe", tmp_path / "q", tokenizer_dir)
    named = calibration_set(load_tokenizer(path), "mixed", 4, 16, 0)  # atomic prune re-reads the profile's windows
    prof = _profile_dir(path, tmp_path / "prof", named)
    out = tmp_path / "atoms"
    r = _cli(path, "--ratio", "0.25", "--granularity", "atom", "--method", "magnitude", "--layout", "exact",
             "--profile", prof, "-o", out)  # fmt: skip
    assert r.exit_code == 0, r.output
    man = Manifest.read(out)
    atoms = man.stage("atom") or man.stage("prune")  # a manifest of schema 1 reads as one "prune" stage
    assert man.command == "prune --granularity atom" and atoms["method"] == "activation_magnitude"
    assert atoms["routed_channels_removed_fraction"] == pytest.approx(0.25, abs=0.01)
    r = _cli(path, "--ratio", "0.25", "--granularity", "atom", "--layout", "per-layer", "-o", tmp_path / "x")
    assert r.exit_code == 2 and "granularity expert" in r.output and not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("family", "layout", "refit"),
    [
        ("qwen3_moe", "uniform", "router+down"),
        ("qwen2_moe", "uniform", "router"),
        ("mixtral", "uniform", "down"),
        pytest.param("deepseek_v3", "per-layer", "router", marks=pytest.mark.slow),
    ],
)
def test_refit_output_reloads_and_changes_only_router_rows_and_down(family, layout, refit, tmp_path, tokenizer_dir):
    """--refit writes the same keys and shapes as plain pruning; the reloaded model equals the base model pruned in
    memory with the written router rows (and down projections) put in, so nothing else changed; each layer's
    calibration error did not grow."""
    from dataclasses import replace

    from moecompress.prune.load import layer_view, set_layer_experts

    path = build_tiny(family, tmp_path / family, tokenizer_dir)
    plain, out = tmp_path / "plain", tmp_path / "refit"
    prune_model(path, plain, PruneOptions(ratio=0.34, layout=layout, refit="none"), tokens=_tokens())
    opts = PruneOptions(ratio=0.34, layout=layout, refit=refit, refit_min_rows=0)  # few tokens: refit them anyway
    man = prune_model(path, out, opts, tokens=_tokens())
    assert man["refit"] == refit and man["options"]["refit"] == refit
    a, b = Checkpoint(plain), Checkpoint(out)
    assert a.tensor_info() == b.tensor_info()  # same keys, shapes and dtypes
    model = reload_clean(out) if layout == "uniform" else loading.load(out)
    base = AutoModelForCausalLM.from_pretrained(path, experts_implementation="eager").eval()
    kept = {int(l): v["kept"] for l, v in man["layers"].items()}
    ref = prune_in_memory(base, kept)
    fam, src = b.family, Checkpoint(path)
    changed = 0
    for l in kept:
        w, orig = b.moe_weights(l), src.moe_weights(l).select(kept[l])
        assert torch.equal(w.gate, orig.gate) and torch.equal(w.up, orig.up)
        changed += int(not torch.equal(w.router, orig.router)) + int(not torch.equal(w.down, orig.down))
        if "down" not in refit:
            assert torch.equal(w.down, orig.down)
        if "router" not in refit:
            assert torch.equal(w.router, orig.router)
        v = layer_view(ref, fam, l)
        set_layer_experts(ref, fam, l, replace(v, router=w.router.float(), down=w.down.float()))
        errs = man["refit_layer_errors"][str(l)]
        before = errs.get("error_after_router", errs["error_before"])
        assert before <= errs["error_before"] + 1e-9
        if "down" in refit:
            assert errs["error_after_down"] <= before + 1e-6
    assert changed > 0
    ids = _tokens().input_ids
    torch.testing.assert_close(_logits(model, ids), _logits(ref, ids), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_output_error_pruning_on_cuda_keeps_the_cpu_experts(family, tmp_path, tokenizer_dir):
    path = build_tiny(family, tmp_path / "m", tokenizer_dir)
    kept = []
    for dev in ("cpu", "cuda"):
        opts = PruneOptions(ratio=0.34, method="output-error", refit="router+down")
        man = prune_model(path, tmp_path / dev, opts, tokens=_tokens(), device=torch.device(dev))
        kept.append({l: v["kept"] for l, v in man["layers"].items()})
    assert kept[0] == kept[1]


def test_down_refit_that_no_expert_can_take_writes_the_unrefitted_bytes(tmp_path, tokenizer_dir, monkeypatch):
    """When every kept expert has fewer routed tokens than the guard needs (min_rows x its width), the down refit
    makes no float32 copy of the kept downs (fit_downs is not called) and the output is byte-identical to --refit
    none."""
    import moecompress.prune.transform as transform

    path = build_tiny("mixtral", tmp_path / "m", tokenizer_dir)
    plain, out = tmp_path / "plain", tmp_path / "refit"
    prune_model(path, plain, PruneOptions(ratio=0.34, refit="none"), tokens=_tokens())

    def never(*a, **k):
        raise AssertionError("fit_downs called although no expert can be refitted")

    monkeypatch.setattr(transform, "fit_downs", never)
    man = prune_model(path, out, PruneOptions(ratio=0.34, refit="down", refit_min_rows=1e9), tokens=_tokens())
    assert man["refit"] == "down"
    a, b = Checkpoint(plain), Checkpoint(out)
    assert a.tensor_info() == b.tensor_info()
    keys = sorted(a.tensor_info())
    ta, tb = a.read(keys), b.read(keys)
    assert all(torch.equal(ta[k], tb[k]) for k in keys)
    monkeypatch.undo()
    with pytest.raises(AssertionError, match="fit_downs called"):  # the guard is what skipped it
        monkeypatch.setattr(transform, "fit_downs", never)
        prune_model(
            path, tmp_path / "again", PruneOptions(ratio=0.34, refit="down", refit_min_rows=0), tokens=_tokens()
        )


def test_own_profile_is_the_profile_without_output_similarity(tmp_path, tokenizer_dir):
    """prune without --profile profiles the model itself without output similarity (nothing in prune reads it; it
    was ~1/3 of that pass): every other statistic is a standalone profile's, and a merge asking it for similarity
    gets a one-line UserError."""
    from moecompress.core.errors import UserError
    from moecompress.profile.files import Profile

    path = build_tiny("qwen3_moe", tmp_path / "q", tokenizer_dir)
    prune_model(path, tmp_path / "out", PruneOptions(ratio=0.25), tokens=_tokens())
    own = Profile.load(tmp_path / "out" / "profile")
    ck = Checkpoint(path)
    full = build_profile(ck, _tokens(), collect(ck, _tokens(), batch_size=8), 0.0)
    sim = {k for k in full.tensors if k.endswith(".output_similarity")}
    assert sim and set(own.tensors) == set(full.tensors) - sim
    assert all(torch.equal(own.tensors[k], full.tensors[k]) for k in own.tensors)
    assert own.super_experts == full.super_experts
    with pytest.raises(UserError, match="moecompress profile"):
        own.layer(own.moe_layers[0], "output_similarity")
    assert torch.equal(own.layer(own.moe_layers[0], "reap"), full.layer(own.moe_layers[0], "reap"))


def test_a_bounded_search_cache_keeps_the_same_experts_and_bytes(tmp_path, tokenizer_dir, monkeypatch):
    """The default prune (output error + down refit) with its expert-output cache cut to one slot per token (what a
    layer much larger than its budget gets, ``order.cache_slots``) keeps the same experts and writes the same bytes
    as with the full cache, except the refitted down projections, equal to float rounding (their activations are
    computed for other batches of rows; a matmul may round a row differently)."""
    import moecompress.prune.order as order
    import moecompress.prune.transform as transform

    path = build_tiny("deepseek_v3", tmp_path / "m", tokenizer_dir)
    full, small = tmp_path / "full", tmp_path / "small"
    m_full = prune_model(path, full, PruneOptions(ratio=0.5), tokens=_tokens())
    slots = []

    class Spy(order.ExpertOutputs):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            slots.append(self.owner.shape[1])

    monkeypatch.setattr(order, "CACHE_FLOOR_BYTES", 1)
    monkeypatch.setattr(order, "CACHE_LAYER_FRACTION", 0.0)
    monkeypatch.setattr(transform, "ExpertOutputs", Spy)
    m_small = prune_model(path, small, PruneOptions(ratio=0.5), tokens=_tokens())
    assert m_small["refit"] == "down" and slots and set(slots) == {1}
    kept = [{l: v["kept"] for l, v in m["layers"].items()} for m in (m_full, m_small)]
    assert kept[0] == kept[1] and all(len(k) < 8 for k in kept[0].values())
    a, b = Checkpoint(full), Checkpoint(small)
    keys = sorted(a.tensor_info())
    assert keys == sorted(b.tensor_info())
    ta, tb = a.read(keys), b.read(keys)
    assert all(torch.equal(ta[k], tb[k]) for k in keys if "down_proj" not in k)
    for k in keys:
        torch.testing.assert_close(ta[k], tb[k], rtol=1e-5, atol=1e-5)
