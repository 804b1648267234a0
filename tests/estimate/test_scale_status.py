"""bench/scale_bench.py --status: issue 13's bound per flagship case and the latest run of each cell."""

from __future__ import annotations

import json

from conftest import load_bench


def _scale_bench():
    return load_bench("scale_bench")


def test_bound_is_two_and_a_half_bf16_layers_plus_the_activation_cache() -> None:
    sb = _scale_bench()
    # DeepSeek-V3 dims, 16 experts: 16 x 3 x 7168 x 2048 bf16 = 1.41 GB; 4,096 tokens x 7168 x 4 B = 117 MB
    assert sb.bound_bytes("dsv3-slice", 16, 256) == int(2.5 * 16 * 3 * 7168 * 2048 * 2 + 4096 * 7168 * 4)
    assert 3.3 < sb.bound_bytes("dsv3-slice", 16, 256) / 2**30 < 3.5
    assert 2.8 < sb.bound_bytes("qwen3-30b-layer", 16, 256) / 2**30 < 2.9
    assert sb.bound_bytes("qwen3-30b-layer", 64, 512) > sb.bound_bytes("qwen3-30b-layer", 16, 256)


def test_status_takes_the_latest_store_and_flags_runs_over_the_bound(tmp_path) -> None:
    sb = _scale_bench()
    bound = sb.bound_bytes("dsv3-slice", 16, 256)

    def run(op: str, peak: int, **extra) -> dict:
        return {"case": "dsv3-slice", "op": op, "samples": 16, "seq_len": 256, "peak_rss_bytes": peak,
                "cpu_s": 10.0, "commit": "abc1234 01:00", **extra}  # fmt: skip

    old = tmp_path / "old.json"
    new = tmp_path / "new.json"
    old.write_text(json.dumps({"runs": {
        "dsv3-slice/prune/16x256": run("prune", bound + 1),
        "dsv3-slice/atom/16x256": run("atom", bound + 1),
        "E16/prune/16x256": {**run("prune", 1), "case": "E16"},
    }}))  # fmt: skip
    new.write_text(json.dumps({"runs": {
        "dsv3-slice/prune/16x256": run("prune", bound),
        "dsv3-slice/merge/16x256": {**run("merge", bound // 2), "failed": "killed at the CPU cap"},
    }}))  # fmt: skip
    rows = {r["op"]: r for r in sb.status_rows([old, new])}
    assert set(rows) == {"prune", "atom", "merge"}  # E16 is not a flagship case
    assert rows["prune"]["under"] and rows["prune"]["store"] == "new.json"  # at the bound counts as under
    assert not rows["atom"]["under"] and rows["atom"]["store"] == "old.json"
    assert not rows["merge"]["complete"] and not rows["merge"]["under"]
    md = sb.render_status_md(list(rows.values()))
    assert "**no**" in md and "not complete: killed at the CPU cap" in md and "abc1234 |" in md


def test_stores_from_a_list_file(tmp_path) -> None:
    sb = _scale_bench()
    listing = tmp_path / "stores.txt"
    listing.write_text(f"{tmp_path / 'a.json'}\n{tmp_path / 'b.json'},{tmp_path / 'c.json'}\n\n")
    assert sb.store_paths(f"@{listing}") == [tmp_path / n for n in ("a.json", "b.json", "c.json")]
    assert sb.store_paths("reports/x.json") == [sb.ROOT / "reports" / "x.json"]
    shipped = sb.store_paths("@bench/scale_stores.txt")  # the list the README's refit command reads
    assert shipped and all(p.exists() for p in shipped)
