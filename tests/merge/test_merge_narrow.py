"""merge with the layers held in the checkpoint's dtype: a bf16 checkpoint's routed experts stay bf16 in the block
(before and after merging, upcast per expert or per cluster where read) and the output is byte-identical to the run
that holds the layer in float32 (bf16 -> float32 is exact; every merge is rounded to bf16 before it is measured)."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny
from moecompress.calibration.sets import TokenSet
from safetensors.torch import load_file

from moecompress.core.checkpoint import Checkpoint
from moecompress.merge.run import MergeOptions, merge_model
from moecompress.merge.transform import MergeTransform


@pytest.mark.parametrize("choose", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_merge_of_a_bf16_layer_held_narrow_equals_the_float32_layer(tmp_path, tokenizer_dir, monkeypatch, choose):
    src = build_tiny("qwen3_moe", tmp_path / "bf16", tokenizer_dir, dtype=torch.bfloat16)
    ids = torch.randint(0, 320, (6, 24), generator=torch.Generator().manual_seed(0))
    tokens = TokenSet(ids, ["rand"] * 6, "random", 0)
    held: dict[bool, list[tuple[torch.dtype, torch.dtype]]] = {True: [], False: []}
    moe_layer = MergeTransform.moe_layer

    def spy(self, ctx):
        before = ctx.experts.gate_up_proj.dtype
        moe_layer(self, ctx)
        held[self.reads_narrow].append((before, ctx.experts.gate_up_proj.dtype))

    monkeypatch.setattr(MergeTransform, "moe_layer", spy)
    out = {}
    for narrow in (True, False):
        monkeypatch.setattr(MergeTransform, "reads_narrow", narrow)
        out[narrow] = tmp_path / f"out-{narrow}"
        merge_model(src, out[narrow], MergeOptions(ratio=0.5, choose=choose), tokens=tokens, device=torch.device("cpu"))
    L = len(Checkpoint(src).moe_layers)
    assert held[True] == [(torch.bfloat16, torch.bfloat16)] * L
    assert held[False] == [(torch.float32, torch.float32)] * L
    files = {n: sorted(out[n].glob("*.safetensors")) for n in out}
    assert [f.name for f in files[True]] == [f.name for f in files[False]]
    for a, b in zip(files[True], files[False], strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name
    assert any(t.dtype == torch.bfloat16 for t in load_file(files[True][0]).values())
