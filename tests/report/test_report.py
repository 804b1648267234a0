"""The HTML report: renders from sidecars only, parses, shows the sidecars' numbers, escapes every string."""

from __future__ import annotations

import json
import random
from html.parser import HTMLParser
from pathlib import Path

import pytest

from moecompress.core.errors import UserError
from moecompress.core.manifest import Manifest
from moecompress.report import build_report, write_report
from moecompress.report.sidecars import load_run
from moecompress.report.svg import pareto_front

EVIL = '<script>alert("x")</script>'
VOID = {"meta", "br", "hr", "img", "input", "link", "col", "area", "base", "wbr", "source"}


def make_profile(layers=(1, 2, 3), n_exp=8, top_k=2, tokens=512, seed=0, model="builtin-moe", domains=True) -> dict:
    """A profile.json as `moecompress profile` writes it (synthetic numbers, consistent counts)."""
    rng = random.Random(seed)
    experts = []
    counts_by_domain = {"shakespeare": [], "python": []}
    for layer in layers:
        w = [rng.random() + 0.05 for _ in range(n_exp)]
        counts = [round(top_k * tokens * x / sum(w)) for x in w]
        counts[-1] = top_k * tokens - sum(counts[:-1])
        split = [rng.randint(0, c) for c in counts]
        counts_by_domain["shakespeare"].append(split)
        counts_by_domain["python"].append([c - s for c, s in zip(counts, split, strict=True)])
        for e in range(n_exp):
            experts.append(
                {
                    "layer": layer,
                    "expert": e,
                    "tokens": counts[e],
                    "frequency": counts[e] / (top_k * tokens),
                    "routing_mass": rng.random() / n_exp,
                    "reap": rng.random() * 3,
                    "max_abs_out": rng.random() * 5 + (400.0 if (layer, e) == (layers[0], 3) else 0.0),
                    "max_abs_channel": rng.randrange(64),
                    "super": (layer, e) == (layers[0], 3),
                    "low_tokens": counts[e] < 40,
                }
            )
    return {
        "model": model,
        "family": "qwen3_moe",
        "top_k": top_k,
        "tokens": tokens,
        "moe_layers": list(layers),
        "num_experts": n_exp,
        "experts": experts,
        "super_experts": [[layers[0], 3]],
        "super_rule": {"percentile": 99.5, "min_ratio_to_max": 0.1, "min_ratio_to_median": 10.0},
        "domains": {d: {"tokens": sum(sum(r) for r in c) // top_k, "counts": c} for d, c in counts_by_domain.items()}
        if domains
        else None,
        "calibration": {"name": "mixed", "fingerprint": "abc123", "samples": 8, "seq_len": 64, "seed": 0},
        "model_fingerprint": "fp-model",
        "tool_version": "0.1.0",
        "elapsed_s": 1.25,
        "warnings": ["2 experts have fewer than 40 routed tokens"],
    }


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def make_manifest(command: str, model: str, **common) -> Manifest:
    """The common fields as a command writes them (each test adds its stages)."""
    base = dict(layout="uniform", load_with="transformers", source_model=model, source_fingerprint="fp-model",
                calibration={"name": "mixed", "fingerprint": "abc123", "samples": 8, "seq_len": 64, "seed": 0},
                params_before=12_000_000, bytes_before=24_000_000)  # fmt: skip
    return Manifest(command=command, **{**base, **common})


def prune_section(prof: Path | None, removed=(0, 5), n_exp=8, layers=(1, 2, 3)) -> dict:
    """A prune stage section with the fields `prune` writes (kept lists per layer, protected super expert)."""
    kept = [e for e in range(n_exp) if e not in removed]
    return {
        "method": "reap", "ratio": 0.25, "granularity": "expert", "experts_before": n_exp,
        "experts_after": len(kept), "experts_removed_total": len(removed) * len(layers), "top_k": 2, "n_group": 1,
        "refit": "none", "protected": [[1, 3]], "protected_why": [{"layer": 1, "expert": 3, "why": "super"}],
        "profile": str(prof) if prof is not None else None, "calibration_fingerprint": "abc123",
        "layers": {str(l): {"kept": kept, "removed": list(removed), "num_experts": len(kept),
                            "old_to_new": {str(e): i for i, e in enumerate(kept)}} for l in layers},
    }  # fmt: skip


def bit_plan(layers=(1, 2, 3), n_exp=8) -> dict:
    """A bit_plan.json as `quantize` writes it: per layer its widths and one record per expert."""

    def bits(layer, e):
        return 2 if e in (0, 5) else (8 if (layer, e) == (1, 3) else 4)

    return {
        "plan": "lp", "granularity": "expert", "target_bits": 3.5, "total_bytes": 8_900_000,
        "few_token_experts": [[2, 1]], "few_token_rule": "fewer than 32 routed calibration tokens: RTN instead of GPTQ",
        "layers": {str(layer): {"bits": sorted({bits(layer, e) for e in range(n_exp)}),
                                "experts": [{"expert": e, "bits": bits(layer, e), "bytes": 1000 * e, "method": "gptq"}
                                            for e in range(n_exp)]} for layer in layers},
    }  # fmt: skip


def make_runs(tmp: Path, model: str = "builtin-moe") -> dict[str, Path]:
    """A profile run and three output folders (prune, merge, quantize) with manifests, bit plan and evals."""
    base_eval = {"perplexity": {"shakespeare": 101.5, "python": 40.25, "all": 70.0}, "kl_to_base": None,
                 "top1_agreement": None, "params": 12_000_000, "bytes": 24_000_000}  # fmt: skip
    prof = tmp / "run"
    write_json(prof / "profile.json", make_profile(model=model))
    write_json(prof / "eval.json", base_eval)
    prune = tmp / "pruned"
    prune.mkdir()
    m = make_manifest("prune", model, params_after=9_000_000, bytes_after=18_000_000, elapsed_s=3.5,
                      warnings=["layer 2: expert 7 never routed"])  # fmt: skip
    m.add("prune", prune_section(prof))
    m.write(prune)
    write_json(prune / "eval.json", {"perplexity": {"shakespeare": 120.0, "python": 45.0, "all": 80.0},
                                     "kl_to_base": 0.21, "top1_agreement": 0.81, "params": 9_000_000,
                                     "bytes": 18_000_000})  # fmt: skip
    write_json(prune / "eval_base.json", base_eval)
    merge = tmp / "merged"
    merge.mkdir()
    m = make_manifest("merge", model, params_after=9_100_000, bytes_after=18_500_000)
    m.add("merge", {"method": "subspace", "ratio": 0.25, "experts_before": 8, "experts_after": 6,
                    "protected": [[1, 3]], "protected_why": [{"layer": 1, "expert": 3, "why": "super expert"}],
                    "layers": {str(layer): {"clusters": [[0, 1], [2], [3], [4, 5], [6], [7]],
                                            "cluster_sizes": [2, 1, 1, 2, 1, 1]} for layer in (1, 2, 3)}})  # fmt: skip
    m.write(merge)
    write_json(merge / "eval.json", {"perplexity": {"shakespeare": 110.0, "python": 44.0, "all": 76.0},
                                     "kl_to_base": 0.15, "top1_agreement": 0.85, "params": 9_100_000,
                                     "bytes": 18_500_000})  # fmt: skip
    quant = tmp / "quant"
    quant.mkdir()
    plan = bit_plan()
    write_json(quant / "bit_plan.json", plan)
    m = make_manifest("quantize", model, layout="quantized", params_after=12_000_000, bytes_after=9_000_000)
    m.add("quantize", {"method": "gptq", "plan": "lp", "bits": 3.5, "protected": [[1, 3]],
                       "layers": {l: {"bits": d["bits"]} for l, d in plan["layers"].items()}})  # fmt: skip
    m.write(quant)
    write_json(quant / "eval.json", {"perplexity": {"shakespeare": 105.0, "python": 41.0, "all": 72.0},
                                     "kl_to_base": 0.3, "top1_agreement": 0.8, "bytes": 9_000_000})  # fmt: skip
    return {"profile": prof, "prune": prune, "merge": merge, "quant": quant}


class Page(HTMLParser):
    """Collects tags, attributes and text; checks that non-void tags are balanced."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}> with open {self.stack[-3:]}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)

    def find(self, tag: str, **attrs) -> list[dict]:
        return [a for t, a in self.tags if t == tag and all(a.get(k) == v for k, v in attrs.items())]

    def keyed(self) -> dict[str, dict]:
        return {a["data-key"]: a for _, a in self.tags if "data-key" in a}


def parse(html: str) -> Page:
    page = Page()
    page.feed(html)
    page.close()
    assert not page.errors, page.errors[:5]
    assert not page.stack, page.stack
    return page


def test_profile_report_matches_sidecar(tmp_path):
    runs = make_runs(tmp_path)
    prof = json.loads((runs["profile"] / "profile.json").read_text())
    page = parse(build_report([runs["profile"]]))
    assert not page.find("script") and not page.find("link") and not page.find("img") and not page.find("iframe")
    # opens offline: nothing is fetched (the only URL is the SVG namespace)
    urls = [v for _, a in page.tags for k, v in a.items() if v and "://" in v]
    assert set(urls) == {"http://www.w3.org/2000/svg"}
    assert not any(k in ("src", "srcset", "action") for _, a in page.tags for k in a)
    for key in ("frequency", "reap", "max_abs_out", "routing_mass"):
        cells = [a for t, a in page.tags if t == "rect" and a.get("class") == "cell" and "data-row" in a
                 and any(a is b for b in _chart_cells(page, f"profile0-{key}"))]  # fmt: skip
        assert len(cells) == 3 * 8
        by_cell = {(int(c["data-row"]), int(c["data-col"])): float(c["data-value"]) for c in cells}
        for e in prof["experts"]:
            assert by_cell[(prof["moe_layers"].index(e["layer"]), e["expert"])] == pytest.approx(e[key], rel=1e-12)
    # super expert outlined in every heatmap, low-token experts dotted
    assert len(page.find("rect", **{"class": "mark"})) == 4
    n_low = sum(e["low_tokens"] for e in prof["experts"])
    assert len(page.find("circle", **{"class": "dot"})) == 4 * n_low
    # per-domain routing: frequency = counts / (top_k x domain tokens)
    dom = _chart_cells(page, "profile0-domain-python")
    d = prof["domains"]["python"]
    got = {(int(c["data-row"]), int(c["data-col"])): float(c["data-value"]) for c in dom}
    assert got[(1, 4)] == pytest.approx(d["counts"][1][4] / (2 * d["tokens"]))
    keyed = page.keyed()
    assert float(keyed["profile.tokens"]["data-value"]) == 512
    assert float(keyed["ppl.run.python"]["data-value"]) == 40.25
    assert "abc123" in "".join(page.text)


def _chart_cells(page: Page, chart: str) -> list[dict]:
    """Cell attributes of one chart, in document order (charts are found by their data-chart id)."""
    out, inside = [], False
    for tag, a in page.tags:
        if tag == "svg":
            inside = a.get("data-chart") == chart
        elif inside and tag == "rect" and a.get("class") == "cell":
            out.append(a)
    return out


def _values(page: Page, chart: str) -> dict[tuple[int, int], float]:
    """(row, column) -> value of one numeric chart's cells."""
    return {(int(c["data-row"]), int(c["data-col"])): float(c["data-value"]) for c in _chart_cells(page, chart)}


def test_compare_runs_pareto_and_actions(tmp_path):
    runs = make_runs(tmp_path)
    page = parse(build_report([runs["prune"], runs["merge"], runs["quant"]]))
    keyed = page.keyed()
    assert float(keyed["run0.kl_to_base"]["data-value"]) == 0.21
    assert float(keyed["run1.top1_agreement"]["data-value"]) == 0.85
    assert keyed["run0.bytes"]["data-before"] == "24000000" and keyed["run0.bytes"]["data-after"] == "18000000"
    assert float(keyed["run2.bytes"]["data-after"]) == 9_000_000
    assert float(keyed["run1.ppl_all"]["data-value"]) == 76.0
    # Pareto: base (24 MB, 0) + three runs; quant (9 MB, 0.3) and merge (18.5 MB, 0.15) and base are on the front
    pts = page.find("circle", **{"class": "point"})
    assert sorted((float(p["data-x"]), float(p["data-y"])) for p in pts) == [
        (9e6, 0.3), (18e6, 0.21), (18.5e6, 0.15), (24e6, 0.0)]  # fmt: skip
    assert page.find("path", **{"class": "front"})
    # prune: experts 0 and 5 removed in every layer, protected expert outlined
    kept = _chart_cells(page, "run0-s0-kept")
    assert len(kept) == 24
    removed = {(int(c["data-row"]), int(c["data-col"])) for c in kept if c["data-value"] == "removed"}
    assert removed == {(r, e) for r in range(3) for e in (0, 5)}
    # merge: cluster sizes per original expert
    sizes = [float(c["data-value"]) for c in _chart_cells(page, "run1-s0-clusters")[:8]]
    assert sizes == [2, 2, 1, 1, 2, 2, 1, 1]
    # quantize: widths from bit_plan.json, mean shown
    plan = json.loads((runs["quant"] / "bit_plan.json").read_text())["layers"]
    recs = [(int(l), r) for l, d in plan.items() for r in d["experts"]]
    bits = _values(page, "run2-s0-bits")
    assert len(bits) == 24 and all(bits[(l - 1, r["expert"])] == r["bits"] for l, r in recs)
    assert float(keyed["bits.mean"]["data-value"]) == pytest.approx(sum(r["bits"] for _, r in recs) / len(recs))
    text = " ".join(page.text)
    assert "super expert" in text and "1 experts fell back" in text and "expert 7 never routed" in text
    assert "Unreadable manifest" not in text
    # the prune manifest points to the profile run: its heatmaps are shown once
    assert len(_chart_cells(page, "profile0-frequency")) == 24


def test_every_string_is_escaped(tmp_path):
    runs = make_runs(tmp_path, model=EVIL)
    prof = json.loads((runs["profile"] / "profile.json").read_text())
    prof["domains"][EVIL] = prof["domains"].pop("python")
    prof["warnings"] = [EVIL]
    write_json(runs["profile"] / "profile.json", prof)
    manifest = json.loads((runs["prune"] / "moecompress.json").read_text())
    manifest["stages"][0]["method"] = EVIL
    manifest["stages"][0][EVIL] = {EVIL: [EVIL]}
    manifest["warnings"] = [EVIL]
    write_json(runs["prune"] / "moecompress.json", manifest)
    html = build_report([runs["profile"], runs["prune"]], title=EVIL)
    page = parse(html)
    assert not page.find("script")
    assert "<script" not in html.lower()
    text = "".join(page.text)
    assert text.count(EVIL) >= 6  # title, h1, model, method, domain caption, warning, manifest key...
    assert all(EVIL not in v for _, a in page.tags for v in a.values() if v and v.startswith("<"))


def test_tolerates_missing_and_broken_files(tmp_path):
    (tmp_path / "empty").mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "moecompress.json").write_text("{not json")
    (broken / "eval.json").write_text("[1, 2]")
    write_json(broken / "profile.json", {"model": "m", "moe_layers": [], "experts": []})
    page = parse(build_report([tmp_path / "empty", broken]))
    text = " ".join(page.text)
    assert "no sidecar files found" in text
    assert "moecompress.json: cannot be read" in text and "expected a JSON object" in text
    assert "Unreadable manifest" in text  # marked as such in the broken folder's "what was done"
    with pytest.raises(UserError):
        build_report([tmp_path / "missing"])
    with pytest.raises(UserError):
        build_report([])


def test_single_json_file_and_write_report(tmp_path):
    runs = make_runs(tmp_path)
    run = load_run(runs["prune"] / "eval.json")
    assert run.eval is not None and run.eval["kl_to_base"] == 0.21
    run = load_run(runs["quant"] / "moecompress.json")
    assert run.manifest is not None and run.manifest.stage("quantize")["plan"] == "lp" and run.bit_plan is None
    out = write_report(runs["prune"])
    assert out == runs["prune"] / "report.html"
    page = parse(out.read_text(encoding="utf-8"))
    assert float(page.keyed()["run0.kl_to_base"]["data-value"]) == 0.21
    assert not list(runs["prune"].glob(".report.*"))


def test_pareto_front():
    pts = [(3.0, 0.1), (1.0, 0.5), (2.0, 0.6), (2.0, 0.2), (4.0, 0.1)]
    assert pareto_front(pts) == [1, 3, 0]


def test_schema1_outputs_still_render(tmp_path):
    """Outputs of moecompress before schema 2 (flat manifests, as the commands wrote them) render as one stage:
    quantize with the bit plan per layer, protected_why, domain windows and a profile pointer; prune's kept lists."""
    prof = make_profile(layers=(0, 1), n_exp=4)
    for d in prof["domains"].values():
        d["windows"] = d.pop("tokens")
    write_json(tmp_path / "run" / "profile.json", prof)
    quant = tmp_path / "quant"
    layers = {str(layer): {"bits": [2, 4], "experts": [{"expert": e, "bits": 4 if e % 2 else 2, "bytes": 100}
                                                       for e in reversed(range(4))]} for layer in (0, 1)}  # fmt: skip
    write_json(quant / "bit_plan.json", {"plan": "lp", "granularity": "expert", "total_bytes": 800,
                                         "few_token_experts": [[1, 2]], "few_token_rule": "fewer than 12 tokens: RTN",
                                         "layers": layers})  # fmt: skip
    write_json(quant / "moecompress.json", {"tool": "moecompress", "tool_version": "0.0.9", "command": "quantize",
                                            "layout": "quantized", "bits": 3.0, "plan": "lp",
                                            "profile": str(tmp_path / "run"),
                                            "layers": {"0": {"bits": [2, 4]}, "1": {"bits": [2, 4]}},
                                            "protected": [[0, 3]],
                                            "protected_why": [{"layer": 0, "expert": 3, "why": "super"},
                                                              {"layer": 0, "module": "shared_expert", "why": "shared"}],
                                            "params_before": 1000, "bytes_before": 2000, "bytes_after": 900,
                                            })  # fmt: skip
    page = parse(build_report([tmp_path / "run", quant], names=["base run", "q3"]))
    assert _values(page, "run0-s0-bits") == {(r, e): (4.0 if e % 2 else 2.0) for r in range(2) for e in range(4)}
    assert [a["data-op"] for a in page.find("h3", **{"class": "stage"})] == ["quantize"]
    text = " ".join(page.text)
    assert "1 experts fell back (fewer than 12 tokens: RTN): L1/E2" in text
    assert "shared_expert" in text and "super" in text and "0.0.9" in text
    assert "calibration windows" in text
    # the profile-only run is the one the manifest points to: shown once, as the q3 run's profile
    heads = [a for t, a in page.tags if t == "th" and a.get("class") == "runname"]
    assert len(heads) == 1 and "q3" in text and "base run" not in text
    assert len(_chart_cells(page, "profile0-frequency")) == 8
    assert load_run(quant / "moecompress.json").manifest.stages[0]["op"] == "quantize"  # a manifest, not a plan
    # a schema-1 prune output (no profile: the chart is as wide as the kept lists show)
    pruned = tmp_path / "pruned"
    write_json(pruned / "moecompress.json", {"command": "prune", "granularity": "expert", "layout": "uniform",
                                             "source_model": "m", "method": "reap", "ratio": 0.5,
                                             "layers": {"0": {"kept": [1, 3]}, "1": {"kept": [0, 3]}}})  # fmt: skip
    html = build_report([pruned])
    kept = {(int(c["data-row"]), int(c["data-col"])) for c in _chart_cells(parse(html), "run0-s0-kept")
            if c["data-value"] == "kept"}  # fmt: skip
    assert kept == {(0, 1), (0, 3), (1, 0), (1, 3)}
    assert (
        "<th>Ratio / bits</th><td>ratio 0.5</td>" in html and "<th>Command / method</th><td>prune / reap</td>" in html
    )


def test_two_stage_manifest_renders_both_sections(tmp_path):
    """`compress` writes one manifest with a section per stage: prune (8 -> 6 experts), then quantize the 6."""
    out = tmp_path / "compressed"
    out.mkdir()
    m = make_manifest("compress", "builtin-moe", layout="quantized", load_with="moecompress.load",
                      params_after=9_000_000, bytes_after=5_000_000, elapsed_s=9.5)  # fmt: skip
    m.add("prune", prune_section(None, removed=(2, 6)))
    m.add("quantize", {"method": "gptq", "plan": "lp", "bits": 3, "other_bits": 8, "protected": [],
                       "layers": {str(l): {"bits": [2, 4, 8]} for l in (1, 2, 3)}})  # fmt: skip
    m.write(out)
    write_json(out / "bit_plan.json", bit_plan(n_exp=6))
    write_json(out / "eval.json", {"perplexity": {"all": 90.0}, "kl_to_base": 0.4, "top1_agreement": 0.7})
    html = build_report([out])
    page = parse(html)
    assert [a["data-op"] for a in page.find("h3", **{"class": "stage"})] == ["prune", "quantize"]
    text = " ".join(page.text)
    assert "Stage 1 of 2: prune (expert pruning)" in text and "Stage 2 of 2: quantize (quantization)" in text
    assert text.index("Stage 1 of 2") < text.index("Kept and removed experts") < text.index("Stage 2 of 2")
    assert text.index("Stage 2 of 2") < text.index("Bit widths")
    # prune: the 8 original experts, 2 and 6 removed; quantize: the 6 experts the prune stage left
    kept = _chart_cells(page, "run0-s0-kept")
    assert len(kept) == 3 * 8
    assert {(int(c["data-row"]), int(c["data-col"])) for c in kept if c["data-value"] == "removed"} == {
        (r, e) for r in range(3) for e in (2, 6)}  # fmt: skip
    bits = _values(page, "run0-s1-bits")
    assert len(bits) == 3 * 6 and bits[(0, 3)] == 8.0 and bits[(1, 0)] == 2.0
    assert "<th>Command / method</th><td>compress / reap + gptq</td>" in html
    assert "<th>Ratio / bits</th><td>ratio 0.25 → 3 bits</td>" in html
    keyed = page.keyed()
    assert keyed["run0.bytes"]["data-after"] == "5000000" and float(keyed["run0.elapsed_s"]["data-value"]) == 9.5
    assert "prune → quantize" in text and "moecompress.load" in text
    assert text.index("Stage 2 of 2") < text.index("numbered as the earlier stages left them (6 per layer)")
    assert "Unreadable manifest" not in text


def test_compress_quantize_stage_without_bit_plan(tmp_path):
    """`compress --prune 0.25 --bits 4` writes no bit_plan.json: one width per layer in the quantize section means
    every expert the prune stage left has it; the stages' recipes are shown with their settings."""
    out = tmp_path / "p25-q4"
    out.mkdir()
    m = make_manifest("compress", "builtin-moe", layout="quantized", load_with="moecompress.load")
    m.add("prune", {"recipe": {"ratio": 0.25}, **prune_section(None)})
    m.add("quantize", {"recipe": {"bits": 4}, "method": "gptq", "bits": 4,
                       "layers": {"1": {"bits": [4]}, "2": {"bits": [4]}, "3": {"bits": [2, 4]}}})  # fmt: skip
    m.write(out)
    page = parse(build_report([out]))
    assert _values(page, "run0-s1-bits") == {(r, e): 4.0 for r in range(2) for e in range(6)}  # layer 3: unknown
    text = " ".join(page.text)
    assert "recipe" in text and "No bit_plan.json" not in text


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda d: d.pop("source_fingerprint"), "moecompress.json field source_fingerprint is None"),
        (lambda d: d.update(params_before="12M"), "moecompress.json field params_before is '12M'"),
        (lambda d: d.update(stages=[{"op": "shrink"}]), "moecompress.json has no valid stages list"),
        (lambda d: d.update(schema=3), "moecompress.json has schema 3"),
    ],
)
def test_schema2_manifest_is_read_strictly(tmp_path, change, reason):
    """A manifest that does not fit the schema is not guessed at: the folder's "what was done" is one clearly
    marked "Unreadable manifest" block with the reason, and the rest of the report (eval) still renders."""
    runs = make_runs(tmp_path)
    f = runs["prune"] / "moecompress.json"
    d = json.loads(f.read_text())
    change(d)
    f.write_text(json.dumps(d))
    page = parse(build_report([runs["prune"]]))
    text = " ".join(page.text)
    assert "Unreadable manifest" in text and reason in text
    assert not page.find("h3", **{"class": "stage"}) and not _chart_cells(page, "run0-s0-kept")
    assert float(page.keyed()["run0.kl_to_base"]["data-value"]) == 0.21


def test_report_inside_a_temporary_output_folder(tmp_path):
    """Commands write report.html inside writer.atomic_dir's `.NAME.tmp-PID-MS` folder: the page names NAME."""
    runs = make_runs(tmp_path)
    tmp_out = tmp_path / ".pruned.tmp-123-456"
    runs["prune"].rename(tmp_out)
    page = parse(write_report(tmp_out, [runs["profile"]]).read_text(encoding="utf-8"))
    heads = [a for t, a in page.tags if t == "th" and a.get("class") == "runname"]
    assert len(heads) == 2
    text = " ".join(page.text)
    assert ".tmp-123" not in text and str(tmp_path / "pruned") in text
    # the shared profile's warnings are listed once, not once per run
    assert text.count("2 experts have fewer than 40 routed tokens") == 1


def test_perplexity_change_against_the_base(tmp_path):
    runs = make_runs(tmp_path)
    html = build_report([runs["prune"], runs["merge"]])
    page = parse(html)
    assert float(page.keyed()["ppl.merged.shakespeare"]["data-value"]) == 110.0
    # merged vs eval_base.json of the pruned folder: 110 / 101.5 - 1 = +8.4%; python 44 / 40.25 - 1 = +9.3%
    assert '<span class="worse">(+8.4%)</span>' in html and '<span class="worse">(+9.3%)</span>' in html
    # without eval_base.json, the profile run's eval of the source model is the base
    (runs["prune"] / "eval_base.json").unlink()
    prof_eval = json.loads((runs["profile"] / "eval.json").read_text())
    write_json(runs["profile"] / "eval.json", {**prof_eval, "model": "builtin-moe"})
    html = build_report([runs["profile"], runs["prune"]])
    assert '<span class="worse">(+18.2%)</span>' in html  # 120 / 101.5


def test_untrusted_counts_are_problems_and_work_is_bounded(tmp_path):
    """A manifest that claims 10**12 experts, a profile with an expert index of 10**15 and a bit plan with 10**9
    layers render in well under a second: each is named in the warnings, and charts use the real sizes."""
    import time

    run = tmp_path / "run"
    prof = make_profile(layers=(0, 1), n_exp=4)
    prof["experts"].append({"layer": 0, "expert": 10**15, "reap": 1.0})
    write_json(run / "profile.json", prof)
    write_json(run / "moecompress.json", {"command": "prune", "experts_before": 10**12,
                                          "layers": {"0": {"kept": [0, 2]}, "1": {"kept": [1, 10**12]}}})  # fmt: skip
    write_json(run / "bit_plan.json", {"layers": {str(10**9): {"experts": [{"expert": 0, "bits": 4}]},
                                                  "0": {"experts": [{"expert": 10**12, "bits": 4}]}}})  # fmt: skip
    t0 = time.monotonic()
    html = build_report([run])
    assert time.monotonic() - t0 < 5
    text = " ".join(" ".join(parse(html).text).split())
    assert "stage 1 (prune): experts_before = 1000000000000 is out of range (a whole number 1..4096); ignored" in text
    assert "1 expert record(s) with a layer or expert index out of range; ignored" in text
    assert "stage 1 (prune): layer 1 lists experts out of range 0..4095; ignored" in text
    assert "2 of 4 routed experts kept over 1 MoE layers" in text  # n from the profile, not 10**12
