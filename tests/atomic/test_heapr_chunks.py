"""HEAPr's full G held a chunk of experts at a time (under --max-memory): the scores, counts and moments are the
whole [E, H, H]'s bit for bit, for any chunk size."""

from __future__ import annotations

import torch
from conftest import build_tiny

from moecompress.atomic.gradstream import streamed_grad_stats
from moecompress.atomic.heapr import ChunkedG, heapr_scores
from moecompress.core.checkpoint import Checkpoint
from moecompress.core.limits import expert_chunk, set_memory_limit


def test_chunked_g_gives_bit_identical_scores_for_any_chunk(tmp_path, tokenizer_dir):
    src = build_tiny("qwen3_moe", tmp_path / "m", tokenizer_dir)
    ckpt = Checkpoint(src)
    ids = torch.randint(0, 320, (4, 16), generator=torch.Generator().manual_seed(0))
    kinds: list[type] = []

    def score(l, st, experts):
        kinds.append(type(st.G))
        return heapr_scores(st.m, experts.down_proj.detach().float(), st.G), st.counts, st.m

    runs = {c: streamed_grad_stats(ckpt, ids, "full", batch_size=2, with_moments=True, on_layer=score, chunk=c)
            for c in (ckpt.num_experts, 1, 3)}  # fmt: skip
    assert kinds.count(ChunkedG) == 2 * len(ckpt.moe_layers)  # chunks of 1 and 3; the whole layer is a tensor
    whole = runs[ckpt.num_experts]
    for c in (1, 3):
        assert sorted(runs[c]) == sorted(whole) == ckpt.moe_layers
        for l in whole:
            for a, b in zip(whole[l], runs[c][l], strict=True):
                assert torch.equal(a, b), (c, l)
            assert whole[l][0].abs().sum() > 0


def test_expert_chunk_follows_max_memory():
    try:
        set_memory_limit(4 * 100 * 10)  # a quarter holds 10 experts of 100 bytes
        assert expert_chunk(64, 100) == 10
        assert expert_chunk(4, 100) == 4
        set_memory_limit(1)
        assert expert_chunk(64, 100) == 1
    finally:
        set_memory_limit(None)
    assert expert_chunk(8, 100, limit=400) == 1


def test_quad_full_row_blocks_equal_the_whole_product(monkeypatch):
    """w_j^T G w_j made a few float64 rows of G at a time (no float64 copy of G) is the whole expression's bit for
    bit, for blocks that divide H and blocks that do not."""
    from moecompress.atomic import heapr

    g = torch.Generator().manual_seed(0)
    H, I = 96, 40
    A = torch.randn(H, H, generator=g)
    Ge = (A @ A.T / H).float()  # [H, H] float32, as accumulated
    W = (torch.randn(H, I, generator=g) * 0.02).to(torch.bfloat16).double()  # a bf16 down projection, upcast
    whole = (W * (Ge.double() @ W)).sum(dim=0)
    for rows in (1, 7, 32, H, 4 * H):
        monkeypatch.setattr(heapr, "QUAD_BLOCK_BYTES", 8 * H * rows)
        q = heapr._quad_full(W, Ge)
        assert q.dtype == torch.float64 and q.shape == (I,)
        assert torch.equal(q, whole), rows
    assert whole.abs().sum() > 0
