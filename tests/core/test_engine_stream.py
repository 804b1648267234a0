"""The layer stream reads a MoE layer's per-expert tensors a chunk of experts at a time into the fused ones: the
loaded layer equals the one read whole (stack + cat), bit for bit, in the checkpoint's dtype and in float32."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny

from moecompress.core.checkpoint import Checkpoint
from moecompress.core.stream import LayerStream, module_state


@pytest.mark.parametrize(
    ("model_type", "dtype"), [("mixtral", torch.bfloat16), ("qwen2_moe", None), ("deepseek_v3", torch.bfloat16)]
)
def test_stacked_read_equals_the_whole_layer_read(tmp_path, tokenizer_dir, model_type, dtype):
    path = build_tiny(model_type, tmp_path / "m", tokenizer_dir, dtype=dtype)
    ck = Checkpoint(path)
    stream = LayerStream(ck, torch.zeros(0, 1, dtype=torch.long))
    for l in ck.moe_layers:
        got = stream.stacked_experts(l)
        assert got is not None, "per-expert keys on disk: the chunked read applies"
        whole = module_state(ck.family, ck.layer_tensors(l), l, ck.num_experts)
        for narrow in (False, True):
            stream.narrow = narrow
            layer = stream.load_layer(l)
            state = layer.state_dict()
            for k, want in whole.items():
                t = state[k]
                if narrow and k.endswith(("gate_up_proj", "down_proj")):
                    assert t.dtype == want.dtype  # held in the checkpoint's dtype
                assert torch.equal(t, want.to(t.dtype)), (l, k, narrow)
            stream.free(layer)


def test_small_chunks_stack_every_expert(tmp_path, tokenizer_dir, monkeypatch):
    """One expert per chunk (the chunk size is a byte bound) still fills every row."""
    path = build_tiny("qwen3_moe", tmp_path / "m", tokenizer_dir, dtype=torch.bfloat16)
    ck = Checkpoint(path)
    stream = LayerStream(ck, torch.zeros(0, 1, dtype=torch.long))
    calls = []
    read = ck.read
    monkeypatch.setattr(ck, "read", lambda keys: calls.append(len(keys)) or read(keys))
    l = ck.moe_layers[0]
    monkeypatch.setattr("moecompress.core.stream.STACK_CHUNK_BYTES", 1)
    _, (gate_up, down) = stream.stacked_experts(l)
    assert calls == [3] * ck.num_experts
    w = ck.family.read_layer(read(list(ck.weight_map)), l, ck.num_experts)
    assert torch.equal(gate_up, torch.cat([w.gate, w.up], dim=1)) and torch.equal(down, w.down)
