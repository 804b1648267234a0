"""Merging on CUDA (issue 13): every merge tensor follows the job's device, and the result matches the CPU's.

Skipped without a GPU (``-m gpu`` selects them; bench/gpu_check.sh runs the gpu-marked tests on a lent device).
The choice between candidates compares measured errors, so float differences between devices could flip a near
tie: the tolerances below are on the measured errors and on the merged model's logits, not on the bytes.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny

from moecompress.core.families import MoEWeights
from moecompress.merge.align import match_neurons
from moecompress.merge.layer import merge_layer
from moecompress.merge.options import MergeOptions
from moecompress.prune.order import RouterSpec

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _layer(E=16, I=96, H=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: (torch.randn(*s, generator=g) * 0.2).to(torch.bfloat16)  # noqa: E731
    return MoEWeights(gate=r(E, I, H), up=r(E, I, H), down=r(E, H, I), router=r(E, H))


def _to(w: MoEWeights, dev: str) -> MoEWeights:
    return MoEWeights(**{k: None if v is None else v.to(dev) for k, v in vars(w).items()})


def test_merge_layer_on_cuda_matches_the_cpu():
    w = _layer()
    x = torch.randn(1500, 64, generator=torch.Generator().manual_seed(1))
    opts = MergeOptions(ratio=0.5, sim_tokens=256, eval_tokens=400)
    spec = RouterSpec(top_k=4)
    res = {}
    for dev in ("cpu", "cuda"):
        merged, info = merge_layer(_to(w, dev), x.to(dev), 8, 4, opts, spec=spec, act=F.silu)
        assert merged.gate.device.type == dev and merged.router.device.type == dev
        res[dev] = (merged, info)
    (mc, ic), (mg, ig) = res["cpu"], res["cuda"]
    assert ig["output_error"] == pytest.approx(ic["output_error"], rel=2e-3)
    assert ig["output_error"] <= ig["output_error_pruning"] + 1e-12
    if ig["choices"] == ic["choices"] and ig["clusters"] == ic["clusters"]:  # same decisions: same weights
        for k in ("gate", "up", "down", "router"):
            torch.testing.assert_close(getattr(mg, k).cpu().float(), getattr(mc, k).float(), rtol=2e-2, atol=2e-2)


def test_blocked_alignment_on_cuda_matches_the_cpu():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(300, 256, generator=g)
    perm = torch.randperm(256, generator=g)
    member = torch.empty_like(ref)
    member[:, perm] = ref + 0.3 * torch.randn(300, 256, generator=g)
    for block in (32, 1024):
        assert torch.equal(match_neurons(ref.cuda(), member.cuda(), block).cpu(), perm)
        assert torch.equal(match_neurons(ref, member, block), perm)


def test_merge_command_on_cuda_matches_the_cpu(tmp_path, tokenizer_dir):
    from conftest import reload_clean

    from moecompress.merge.run import merge_model

    src = build_tiny("mixtral", tmp_path / "m", tokenizer_dir, seed=3)
    ids = torch.randint(1, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    logits, errors = {}, {}
    for dev in ("cpu", "cuda"):
        man = merge_model(src, tmp_path / dev, MergeOptions(ratio=0.5), samples=6, seq_len=32,
                          device=torch.device(dev)).stage("merge")  # fmt: skip
        errors[dev] = [v["output_error"] for v in man["layers"].values()]
        with torch.no_grad():
            logits[dev] = reload_clean(tmp_path / dev)(ids).logits
    assert errors["cuda"] == pytest.approx(errors["cpu"], rel=5e-3)
    torch.testing.assert_close(logits["cuda"], logits["cpu"], rtol=5e-2, atol=5e-2)
