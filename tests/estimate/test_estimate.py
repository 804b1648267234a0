"""estimate: shapes from config.json agree with the real transformers models; predictions move the right way with
tokens, device and --max-memory; the least-squares fit recovers known coefficients; the shipped fit is complete."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAMILIES, tiny_config
from transformers import AutoModelForCausalLM

from moecompress.core.errors import UserError
from moecompress.estimate import check_fits, coefficients, predict, shape_of_config, shape_of_folder
from moecompress.estimate.fit import fit_terms
from moecompress.estimate.model import Settings, features, variant

VARIANTS = ("profile", "prune", "prune-reap", "prune-refit", "merge", "quantize-rtn", "quantize-gptq", "quantize-lp",
            "atom")  # fmt: skip


def unit_coefs() -> dict:
    """Every term's coefficient 1: predictions are the plain sums of the terms (no fitted numbers involved)."""
    host_terms = ("const", "layer", "acts", "sim", "err", "cache", "downs", "hidden", "align", "codes", "hessians", "G")
    ones = {n: 1.0 for n in host_terms}
    time_terms = ("const", "fwd", "sim", "search", "refit", "downfit", "svd", "clip", "gptq", "hessians", "grads")
    time_terms += ("score", "visits")
    secs = {n: 1e-9 for n in time_terms}
    return {"ops": {v: {"host": dict(ones), "seconds": dict(secs)} for v in VARIANTS}}


@pytest.mark.parametrize("family", FAMILIES)
def test_shape_counts_the_real_parameters(family: str) -> None:
    cfg = tiny_config(family)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    real = sum(p.numel() for p in model.parameters())
    shape = shape_of_config(cfg)
    assert abs(shape.params - real) / real < 0.02, (shape, real)  # norms and biases are left out
    assert shape.moe_layers == (2 if family in ("qwen2_moe", "deepseek_v3") else 3)


def test_shape_of_a_config_only_folder(tmp_path) -> None:
    """A 700 GB model can be planned from config.json alone: no weights in the folder."""
    (tmp_path / "config.json").write_text(tiny_config("deepseek_v3").to_json_string())
    shape = shape_of_folder(tmp_path)
    assert (shape.experts, shape.top_k, shape.width, shape.shared_width) == (8, 2, 24, 24)
    assert shape.layers == 3 and shape.moe_layers == 2


def test_predictions_move_the_right_way() -> None:
    shape = shape_of_config(tiny_config("qwen3_moe", hidden_size=512, num_experts=64, moe_intermediate_size=256))
    c = unit_coefs()
    small = predict(shape, "quantize", coefs=c, samples=16, seq_len=256)
    big = predict(shape, "quantize", coefs=c, samples=64, seq_len=256)
    assert big.host_bytes > small.host_bytes and big.seconds > small.seconds
    gpu = predict(shape, "quantize", coefs=c, samples=16, seq_len=256, device="cuda")
    assert gpu.gpu_bytes > 0 and gpu.host_bytes < small.host_bytes and small.gpu_bytes == 0
    # Hessians are held a chunk of experts at a time: a quarter of --max-memory (or of the machine), never below
    # one expert's
    hess = features(shape, "quantize-lp", Settings())[1]["hessians"]
    capped = predict(shape, "quantize", coefs=c, samples=16, seq_len=256, max_memory=int(hess))
    assert capped.terms["hessians"] == pytest.approx(0.25 * hess, rel=1e-6)
    # the LP's codes at every width (17 bits per routed weight, every MoE layer) stay in memory up to
    # quant.run.code_memory_bound (256 MiB here, at most half of --max-memory); past it they go to files
    codes = shape.moe_layers * 3 * 64 * 512 * 256 * 17 / 8
    assert small.terms["codes"] == pytest.approx(codes, rel=1e-6) and small.disk_bytes == 0
    assert capped.terms["codes"] == 0 and capped.disk_bytes == int(codes)
    old = predict(shape, "quantize", coefs=c, samples=16, seq_len=256, max_memory=int(hess), codes_spill=False)
    assert old.terms["codes"] == pytest.approx(0.5 * hess, rel=1e-6) and old.disk_bytes == 0  # the rule before
    machine = predict(shape, "quantize", coefs=c, samples=16, seq_len=256, memory=int(hess))
    assert machine.host_bytes == capped.host_bytes
    floor = predict(shape, "quantize", coefs=c, samples=16, seq_len=256, max_memory=1)
    assert floor.host_bytes < capped.host_bytes
    assert floor.terms["hessians"] == pytest.approx(hess / 64, rel=1e-6)
    # the activation cache spills to disk past 4 GiB (engine rule) and is then not held in memory
    huge = predict(shape, "profile", coefs=c, samples=4096, seq_len=2048)
    assert huge.disk_bytes == 2 * 4 * 4096 * 2048 * 512 and huge.host_bytes < huge.disk_bytes
    assert predict(shape, "profile", coefs=c, samples=16, seq_len=256).disk_bytes == 0
    # compress: one profile pass plus the stages, at the largest stage's peak
    comp = predict(shape, "compress", coefs=c, samples=16, seq_len=256, stages=["prune", "quantize"])
    stages = [predict(shape, op, coefs=c, samples=16, seq_len=256, plan="uniform") for op in ("prune", "quantize")]
    assert comp.host_bytes == max(p.host_bytes for p in [*stages, predict(shape, "profile", coefs=c, samples=16)])
    assert comp.seconds > small.seconds


def test_variants() -> None:
    assert variant("prune", Settings(method="reap")) == "prune-reap"
    assert variant("prune", Settings(refit="router+down")) == "prune-refit"
    assert variant("quantize", Settings(plan="uniform")) == "quantize-gptq"
    assert variant("quantize", Settings(method="rtn")) == "quantize-rtn"
    with pytest.raises(ValueError):
        predict(shape_of_config(tiny_config("mixtral")), "shrink", coefs=unit_coefs())


def test_default_prune_is_priced_with_its_down_refit() -> None:
    """The default prune (output error) refits the kept down projections (prune.transform.default_refit): its
    prediction carries the float32 downs, the activations fit_downs reads and the fit's time; --refit none and the
    score methods (default refit none) do not."""
    shape = shape_of_config(tiny_config("qwen3_moe", hidden_size=512, num_experts=64, moe_intermediate_size=256))
    c = unit_coefs()
    default = predict(shape, "prune", coefs=c, samples=16, seq_len=256)
    plain = predict(shape, "prune", coefs=c, samples=16, seq_len=256, refit="none")
    down = predict(shape, "prune", coefs=c, samples=16, seq_len=256, refit="down")
    assert default == down and default.variant == plain.variant == "prune"
    assert default.terms["downs"] == 4.0 * 64 * 512 * 256 and "downs" not in plain.terms
    assert default.host_bytes > plain.host_bytes and default.seconds > plain.seconds
    assert "downfit" not in features(shape, "prune-reap", Settings(method="reap"))[2]
    assert "downs" not in features(shape, "prune", Settings(method="reap"))[0]  # reap's default refit is none
    # the compress prune stage is the default prune too
    comp = predict(shape, "compress", coefs=c, samples=16, seq_len=256, stages=["prune"])
    assert comp.host_bytes == max(default.host_bytes, predict(shape, "profile", coefs=c, samples=16).host_bytes)
    # the shipped fit has the down refit's terms, from runs measured with it (the downs' memory may fit to zero:
    # since commit 69aa4f2 the block is pruned to the kept experts before their float32 downs are made)
    shipped = coefficients()["ops"]["prune"]
    assert "downs" in shipped["host"] and "downfit" in shipped["seconds"]


def test_own_profile_passes_without_a_merge_are_priced_without_similarity() -> None:
    """prune's own profile pass (every method) and compress's without a merge stage measure no output similarity
    (prune/run.py, compress/run.py): no similarity term in their prediction; a profile and merge keep theirs, and
    a compress with a merge stage prices its profile pass with it."""
    shape = shape_of_config(tiny_config("qwen3_moe", hidden_size=512, num_experts=64, moe_intermediate_size=256))
    c, tok = unit_coefs(), {"samples": 16, "seq_len": 256}
    for var, s in (("prune", Settings()), ("prune-reap", Settings(method="reap")), ("prune-refit", Settings())):
        mem, _, tim = features(shape, var, s)
        assert mem["sim"] == 0 and tim["sim"] == 0
        assert features(shape, var, Settings(sim_tokens=256))[0]["sim"] == 4.0 * 256 * 64 * 512  # runs from before
    assert features(shape, "profile", Settings())[0]["sim"] == 4.0 * 256 * 64 * 512
    assert features(shape, "merge", Settings())[0]["sim"] == 4.0 * 512 * 64 * 512
    base = c["ops"]["profile"]["seconds"]["const"]
    prof = {n: predict(shape, "profile", coefs=c, sim_tokens=n, **tok) for n in (0, 256)}
    assert prof[256].seconds > prof[0].seconds
    quant = predict(shape, "quantize", coefs=c, plan="uniform", **tok)
    merge = predict(shape, "merge", coefs=c, **tok)
    q = predict(shape, "compress", coefs=c, stages=["quantize"], **tok)
    assert q.seconds == pytest.approx(prof[0].seconds + quant.seconds - base)
    m = predict(shape, "compress", coefs=c, stages=["merge", "quantize"], **tok)
    assert m.seconds == pytest.approx(prof[256].seconds + merge.seconds + quant.seconds - 2 * base)
    # a prune reusing a profile saves its own pass, the one without similarity
    prune = predict(shape, "prune", coefs=c, **tok)
    reused = predict(shape, "prune", coefs=c, profile_reused=True, **tok)
    assert reused.seconds == pytest.approx(prune.seconds - prof[0].seconds + base)


def test_refusal_advice_follows_the_dominant_term() -> None:
    """A prune whose peak is the down refit's float32 downs is told --refit none; a score-method prune is not."""
    from moecompress.estimate.fits import advice
    from moecompress.estimate.model import Estimate

    terms = {"const": 5e8, "layer": 1e9, "downs": 8e9, "hidden": 1e8}
    assert "--refit none" in advice(Estimate("prune", "prune", 10**10, 0, 0, 1.0, terms), False)
    assert "--refit none" not in advice(Estimate("prune", "prune-reap", 10**10, 0, 0, 1.0, terms), False)


def test_fit_recovers_known_coefficients() -> None:
    truth = {"const": 0.5, "layer": 2.5, "acts": 1.0}
    rows = [{"const": 1.0, "layer": float(l), "acts": float(a)} for l in (1e6, 4e7, 3e8) for a in (2e5, 9e7)]
    measured = [sum(truth[n] * r[n] for n in r) for r in rows]
    got = fit_terms(rows, measured)
    assert got == pytest.approx(truth, rel=1e-6)
    with pytest.raises(ValueError):
        fit_terms([], [])


def test_check_fits_refuses_in_one_line() -> None:
    shape = shape_of_config(tiny_config("qwen3_moe"))
    est = predict(shape, "quantize", coefs=unit_coefs(), samples=8, seq_len=32)
    check_fits(est, "cpu", max_memory=est.host_bytes)  # exactly at the limit fits
    with pytest.raises(UserError) as err:
        check_fits(est, "cpu", max_memory=est.host_bytes - 1)
    msg = str(err.value)
    assert "\n" not in msg and "quantize is predicted to need" in msg and "torchrun" in msg


def test_shipped_coefficients_cover_every_variant() -> None:
    c = coefficients()
    assert c["command"].startswith("OMP_NUM_THREADS=1 ") and "scale_bench.py" in c["command"]
    for v in VARIANTS:
        assert v in c["ops"], v
        assert c["ops"][v]["host"].get("const", 0) > 0 and c["ops"][v]["runs"]
    shape = shape_of_config(tiny_config("mixtral"))
    for op in ("profile", "prune", "atom", "merge", "quantize", "compress"):
        est = predict(shape, op, samples=8, seq_len=32)
        assert 2**26 < est.host_bytes < 2**34 and est.seconds > 0  # a tiny model: a Python process, seconds
    json.dumps(c)


def test_fit_prior_decides_only_what_the_runs_leave_open() -> None:
    """One run cannot tell a constant from a size term: the size term keeps its prior, the constant takes the
    rest; with runs that vary the size, the data wins over the prior."""
    prior = {"const": 1.0, "layer": 2.0}
    got = fit_terms([{"const": 1.0, "layer": 10.0}], [50.0], prior)
    assert got["layer"] == pytest.approx(2.0, rel=1e-3) and got["const"] == pytest.approx(30.0, rel=1e-2)
    rows = [{"const": 1.0, "layer": float(l)} for l in (10.0, 100.0, 1000.0)]
    got = fit_terms(rows, [5.0 + 3.0 * r["layer"] for r in rows], prior)
    assert got["layer"] == pytest.approx(3.0, rel=1e-2) and got["const"] == pytest.approx(5.0, rel=0.1)


def test_quantize_time_follows_the_weights_through_the_clip_search() -> None:
    """RTN's and the LP plan's time grow with the routed weights they quantize (the clip term, once per width: the
    LP plan's four), in the shipped fit; before the term had its own prior, RTN's time was flat in the model's
    size (1.1 s at 16 and at 256 experts, 0.8 and 5.7 s measured)."""
    c = coefficients()
    assert c["clip_per_s"] < c["mac_per_s"] / 100  # elementwise work: far slower per unit than a multiply-add
    small, big = (shape_of_config(tiny_config("qwen3_moe", hidden_size=512, num_experts=e, moe_intermediate_size=256))
                  for e in (16, 256))  # fmt: skip
    for plan in ("uniform", "lp"):
        kw = {"samples": 16, "seq_len": 256, "plan": plan, "method": "rtn" if plan == "uniform" else "gptq"}
        s, b = predict(small, "quantize", **kw).seconds, predict(big, "quantize", **kw).seconds
        assert b > 3 * s, (plan, s, b)
    _, _, t = features(big, "quantize-lp", Settings())
    _, _, t1 = features(big, "quantize-rtn", Settings())
    assert t["clip"] == 4 * t1["clip"] == 4 * big.moe_layers * big.moe_layer_params


def test_atom_is_priced_with_the_layer_it_holds() -> None:
    """HEAPr holds the routed experts in the checkpoint's dtype (bf16: half the float32 layer); runs of the code
    before that are fitted with ``narrow=False``; merge is priced in float32 (estimate/model.py NARROW)."""
    shape = shape_of_config(tiny_config("qwen3_moe", hidden_size=512, num_experts=64, moe_intermediate_size=256))
    assert shape.dtype_bytes == 2
    bf16 = features(shape, "atom", Settings())[0]["layer"]
    fp32 = features(shape, "atom", Settings(narrow=False))[0]["layer"]
    assert fp32 - bf16 == pytest.approx(2 * shape.moe_layer_params)
    assert features(shape, "merge", Settings())[0]["layer"] == fp32
