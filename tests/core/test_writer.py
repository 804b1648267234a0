"""The shard writer: shards end at layer boundaries once LAYER_FLUSH_BYTES (or a sixteenth of --max-memory) are
buffered, so the next layer is computed without the previous layers' output held; the folder loads the same."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny, reload_clean
from safetensors import safe_open

from moecompress.core.checkpoint import Checkpoint
from moecompress.core.engine import Engine
from moecompress.core.limits import set_memory_limit
from moecompress.core.manifest import Manifest
from moecompress.core.output import Output
from moecompress.core.writer import LAYER_FLUSH_BYTES, ShardWriter, layer_flush_bytes


def _tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def _write(src, out, **kw):
    ck = Checkpoint(src)
    with Output(out, **kw) as o:
        o.add_globals(ck)
        Engine(ck, torch.zeros(0, 1, dtype=torch.long), 4, torch.device("cpu"), "w").run([], emit=o.add_layer)
        man = Manifest("test", "uniform", "transformers", str(ck.path), ck.fingerprint, None, ck.num_params,
                       ck.bytes_on_disk)  # fmt: skip
        o.finish(ck, ck.config.to_dict(), man, report=False)
    return json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]


def test_boundary_writes_a_shard_only_once_the_bound_is_buffered(tmp_path):
    w = ShardWriter(tmp_path)
    assert not w.boundary(0)  # nothing buffered: no empty shard
    w.add("a", torch.zeros(4))  # 16 bytes
    assert w.buffered == 16 and not w.boundary(17)
    w.add("b", torch.zeros(2, dtype=torch.bfloat16))
    assert w.boundary(20) and w.buffered == 0
    w.add("c", torch.ones(3))
    index = w.close()
    assert index["weight_map"] == {
        "a": "model-00001-of-00002.safetensors",
        "b": "model-00001-of-00002.safetensors",
        "c": "model-00002-of-00002.safetensors",
    }
    assert index["metadata"]["total_size"] == 16 + 4 + 12
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
    ]  # fmt: skip


def test_the_bound_is_a_sixteenth_of_max_memory_at_most():
    try:
        set_memory_limit(None)
        assert layer_flush_bytes() == LAYER_FLUSH_BYTES
        set_memory_limit(1 << 30)
        assert layer_flush_bytes() == (1 << 30) // 16
        set_memory_limit(1 << 40)
        assert layer_flush_bytes() == LAYER_FLUSH_BYTES
    finally:
        set_memory_limit(None)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_a_shard_per_layer_holds_the_same_tensors_and_loads_in_transformers(tmp_path, tokenizer_dir, dtype):
    src = build_tiny("qwen3_moe", tmp_path / "src", tokenizer_dir, dtype=dtype, num_hidden_layers=3)
    whole = _write(src, tmp_path / "whole")  # a tiny model stays under the bound: one shard, as before
    assert set(whole.values()) == {"model-00001-of-00001.safetensors"}
    per_layer = _write(src, tmp_path / "per-layer", layer_flush_bytes=1)
    files = sorted(set(per_layer.values()))
    assert files == [f"model-{i:05d}-of-00004.safetensors" for i in range(1, 5)]  # globals, then one per layer
    for key, f in per_layer.items():
        if key.startswith("model.layers."):
            assert f == files[1 + int(key.split(".")[2])], key
        else:
            assert f == files[0], key
    a, b = _tensors(tmp_path / "whole"), _tensors(tmp_path / "per-layer")
    assert a.keys() == b.keys() == per_layer.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    model = reload_clean(tmp_path / "per-layer")
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        ref = reload_clean(tmp_path / "whole")(input_ids=ids).logits
        torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=0, atol=0)


def test_a_tensor_given_with_load_is_read_when_its_shard_is_written(tmp_path):
    data = {"a": torch.arange(6, dtype=torch.bfloat16), "b": torch.ones(2, 3)}
    reads: list[str] = []

    def load(k):
        reads.append(k)
        return data[k].clone()

    for d in ("lazy", "eager", "bad"):
        (tmp_path / d).mkdir()
    w = ShardWriter(tmp_path / "lazy")
    w.add("a", data["a"], lambda: load("a"))
    w.add("b", data["b"])
    assert w.buffered == 12 + 24 and not reads  # its size counts at once; nothing read yet
    index = w.close()
    assert reads == ["a"]
    ref = ShardWriter(tmp_path / "eager")
    for k, t in data.items():
        ref.add(k, t)
    assert index == ref.close()
    one = "model-00001-of-00001.safetensors"
    assert (tmp_path / "lazy" / one).read_bytes() == (tmp_path / "eager" / one).read_bytes()
    bad = ShardWriter(tmp_path / "bad")
    bad.add("a", data["a"], lambda: data["b"])
    with pytest.raises(ValueError, match="read again"):
        bad.close()


def test_output_holds_no_global_between_add_globals_and_the_flush(tmp_path, tokenizer_dir):
    src = build_tiny("qwen3_moe", tmp_path / "src", tokenizer_dir, dtype=torch.bfloat16)
    ck = Checkpoint(src)
    with Output(tmp_path / "out") as o:
        o.add_globals(ck)
        assert o.shards is not None and o.shards._shard
        assert all(callable(v) for v in o.shards._shard.values())  # sizes only: no tensor (nor its mapped pages)
