"""Per-projection options in the byte-budget plan: priced as quantize prices them, the quantize-only plan is
quantize's per-projection LP plan written byte for byte as quantize writes it, pairs are written per projection and
load exactly, servable plans have none."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import build_tiny, reload_clean
from safetensors.torch import load_file

import moecompress
from moecompress.budget.options import FRACTIONS, PAIRS
from moecompress.budget.plan import Structure, bf16_bytes, byte_model, make_plan
from moecompress.budget.run import measure_budget, write_plan
from moecompress.core.job import Job
from moecompress.quant.plan import Layout, scale_dtype_of
from moecompress.quant.run import run_quantize

CAL = {"samples": 4, "seq_len": 32, "batch_size": 2}


@pytest.fixture(scope="module")
def qwen(tmp_path_factory, tokenizer_dir):
    return build_tiny("qwen3_moe", tmp_path_factory.mktemp("m") / "qwen3", tokenizer_dir)


@pytest.fixture(scope="module")
def measured(qwen):
    job = Job.prepare(qwen, None, **CAL)
    m, kl = measure_budget(job, None, check=True)
    return job, m, kl


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_pair_options_are_priced_as_quantize_prices_them(qwen):
    job = Job.prepare(qwen, None, **CAL)
    s = Structure(job.ckpt, False, 8, [], FRACTIONS, PAIRS)
    lay, sb = Layout(job.ckpt), scale_dtype_of(job.ckpt).itemsize
    _, row, _, _ = byte_model(job.ckpt, 8)
    full = [(j, o) for j, o in enumerate(s.opts[s.moe[0]]) if not o.removed and o.fraction == 1.0]
    assert sorted(o.pair for _, o in full) == sorted(PAIRS)  # quantize's whole per-projection menu at full width
    for j, o in full:
        assert s.nbytes[0, 0, j] == lay.expert_bytes(o.pair, sb) + row
    # servable plans: one width for every projection (transformers reads one width per fused experts module)
    srv = Structure(job.ckpt, True, 8, [], FRACTIONS, PAIRS)
    for j, o in enumerate(srv.opts[srv.moe[0]]):
        assert bool(srv.allowed[:, :, j].any()) == (o.removed or o.uniform)


@pytest.mark.slow
def test_the_quantize_only_plan_is_quantizes_lp_plan_written_byte_for_byte(qwen, measured, tmp_path):
    """The guard's alternative (make_plan bits_only) chooses what `quantize --plan lp --granularity expert
    --budget-gb` chooses from its own measuring pass, and its write is quantize's output tensor for tensor."""
    job, m, kl = measured
    lay, sb = Layout(job.ckpt), scale_dtype_of(job.ckpt).itemsize
    budget = lay.fixed_bytes(8, sb) + len(lay.moe) * lay.E * lay.expert_bytes((3, 4), sb)  # 3.33 bits per weight
    alt = make_plan(job.ckpt, m, kl, budget, False, 8, [], "test", bits_only=True)
    q = tmp_path / "q"
    qp = run_quantize(qwen, q, plan="lp", granularity="expert", budget_gb=budget / 1e9, calib="mixed", seed=0, **CAL)
    assert not qp["super_experts"]  # both plans protect the same experts (none on this model)
    for l, v in alt["layers"].items():
        got = [(r["gate_up_bits"], r["down_bits"], r["removed"], r["width"]) for r in v["experts"]]
        want = [(r["gate_up_bits"], r["down_bits"], False, alt["source_width"]) for r in qp["layers"][l]["experts"]]
        assert got == want
    assert len({(r["gate_up_bits"], r["down_bits"]) for v in alt["layers"].values() for r in v["experts"]}) > 1
    assert alt["total_bytes"] == qp["total_bytes"] and alt["propagate_quantized"] is False
    # the joint plan's feasible set holds it: its predicted cost is no higher (within the solver's proved gap)
    joint = make_plan(job.ckpt, m, kl, budget, False, 8, [], "test")
    assert joint["predicted_cost"] <= alt["predicted_cost"] * (1 + 1e-3) + 1e-12
    b = tmp_path / "b"
    write_plan(Job.prepare(qwen, b, tokens=job.tokens(), **CAL), None, False, alt, m, 8)
    tb, tq = _tensors(b), _tensors(q)
    assert set(tb) == set(tq)
    for k in tq:
        assert torch.equal(tb[k], tq[k]), k


@pytest.mark.slow
def test_the_servable_quantize_only_plan_is_quantizes_layer_lp_plan_written_byte_for_byte(qwen, measured, tmp_path):
    """With --servable the guard's alternative is `quantize --plan lp --granularity layer --budget-gb` (quantize's
    servable plan: one width per layer), chosen alike and written tensor for tensor; the servable program holds it
    (its predicted cost is no higher); per-layer widths load with moecompress.load as the engine judged them."""
    job, m, kl = measured
    lay, sb = Layout(job.ckpt), scale_dtype_of(job.ckpt).itemsize
    per = (lay.expert_bytes(3, sb) + lay.expert_bytes(4, sb)) / 2  # 3.5 bits per weight: layers at 3 and 4 bits
    budget = lay.fixed_bytes(8, sb) + len(lay.moe) * lay.E * per
    alt = make_plan(job.ckpt, m, kl, budget, True, 8, [], "test", bits_only=True)
    q = tmp_path / "q"
    qp = run_quantize(qwen, q, plan="lp", granularity="layer", budget_gb=budget / 1e9, calib="mixed", seed=0, **CAL)
    for l, v in alt["layers"].items():
        got = [(r["gate_up_bits"], r["down_bits"], r["removed"], r["width"]) for r in v["experts"]]
        want = [(r["gate_up_bits"], r["down_bits"], False, alt["source_width"]) for r in qp["layers"][l]["experts"]]
        assert got == want
    assert alt["total_bytes"] == qp["total_bytes"] and alt["restriction"].startswith("quantize's per-layer LP plan")
    if not qp["protected"]:  # then one width per layer, inside the servable program's choices
        joint = make_plan(job.ckpt, m, kl, budget, True, 8, [], "test")
        assert joint["predicted_cost"] <= alt["predicted_cost"] * (1 + 1e-9) + 1e-12
    b = tmp_path / "b"
    man = write_plan(Job.prepare(qwen, b, tokens=job.tokens(), **CAL), None, False, alt, m, 8)
    tb, tq = _tensors(b), _tensors(q)
    assert set(tb) == set(tq)
    for k in tq:
        assert torch.equal(tb[k], tq[k]), k
    mixed = len({r["gate_up_bits"] for v in alt["layers"].values() for r in v["experts"]}) > 1
    assert mixed  # layers at different widths
    assert man.load_with == ("moecompress.load" if mixed else "transformers")
    b = tmp_path / "b16"  # other weights unquantized: the judge's KL is the loaded model's (the engine runs the
    # source's attention; --other-bits is applied as the tensors are written)
    man, kl_engine = write_plan(Job.prepare(qwen, b, tokens=job.tokens(), **CAL), None, False, alt, m, 16,
                                measure_kl=True)  # fmt: skip
    with torch.no_grad():
        src = torch.log_softmax(reload_clean(qwen)(input_ids=m.judge).logits.float(), -1)
        got = torch.log_softmax(moecompress.load(b)(input_ids=m.judge).logits.float(), -1)
    assert float((src.exp() * (src - got)).sum(-1).mean()) == pytest.approx(kl_engine, rel=1e-3)


def test_pairs_are_written_per_projection_and_load_as_the_dequantized_plan(qwen, measured, tmp_path):
    """A plan with per-projection widths, a removal and a cut: on disk each projection is packed at its own bits,
    and moecompress.load's logits give the KL the write pass measured on its judge windows (the dequantized plan as
    the engine ran it)."""
    job, m, kl = measured
    plan = make_plan(job.ckpt, m, kl, 0.95 * bf16_bytes(job.ckpt), False, 16, [], "test")
    I = plan["source_width"]
    cut = min(w for w in m.widths[job.ckpt.moe_layers[0]])
    assert cut < I
    pairs = [(2, 8), (8, 2), (4, 2), (2, 4), (8, 8)]
    for v in plan["layers"].values():
        for r in v["experts"]:
            e = r["expert"]
            bg, bd = pairs[e % len(pairs)]
            r.update(removed=e == 0, width=cut if e == 1 else I, gate_up_bits=bg, down_bits=bd)
            r["bits"] = 0 if e == 0 else bg if bg == bd else (2 * bg + bd) / 3
        v["kept_experts"] = [r["expert"] for r in v["experts"] if not r["removed"]]
        v["widths"] = [r["width"] for r in v["experts"] if not r["removed"]]
        v["bits"] = [r["bits"] for r in v["experts"] if not r["removed"]]
    out = tmp_path / "p"
    man, kl_engine = write_plan(Job.prepare(qwen, out, tokens=job.tokens(), **CAL), None, False, plan, m, 16,
                                measure_kl=True)  # fmt: skip
    assert kl_engine is not None and kl_engine > 0
    fam, t = job.ckpt.family, _tensors(out)
    H = job.ckpt.config.hidden_size
    for l, v in plan["layers"].items():
        for k, r in enumerate(r for r in v["experts"] if not r["removed"]):  # renumbered 0..n-1 on disk
            for proj, (rows, cols, bits) in enumerate(
                [(r["width"], H, r["gate_up_bits"]), (r["width"], H, r["gate_up_bits"]),
                 (H, r["width"], r["down_bits"])]
            ):  # fmt: skip
                base = fam.expert_key(int(l), k, proj)[: -len(".weight")]
                assert t[base + ".weight_shape"].tolist() == [rows, cols]
                assert t[base + ".weight_packed"].shape == (rows, -(-cols * bits // 32)), (base, bits)
    assert json.loads((out / "plan.json").read_text())["propagate_quantized"] is False  # judged via ctx.extra
    ids = m.judge
    assert ids is not None
    with torch.no_grad():
        src = torch.log_softmax(reload_clean(qwen)(input_ids=ids).logits.float(), -1)
        got = torch.log_softmax(moecompress.load(out)(input_ids=ids).logits.float(), -1)
    kl_loaded = float((src.exp() * (src - got)).sum(-1).mean())
    assert kl_loaded == pytest.approx(kl_engine, rel=1e-3)
    assert np.isfinite(kl_loaded)
