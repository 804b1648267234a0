"""The dense-carved test model (tests/carved.py): experts sum to the dense FFN, and its router is meaningful."""

import carved
import torch
from carved import WIDTH, carve, dense_ffn, moe_inputs
from transformers import AutoModelForCausalLM

carved_model = carved.carved_model


def test_carved_experts_sum_to_the_dense_ffn():
    gen = torch.Generator().manual_seed(0)
    w_gate, w_up, w_down = torch.randn(80, 16, generator=gen), torch.randn(80, 16, generator=gen), torch.randn(16, 80)
    group = torch.randperm(80, generator=gen) % 4
    gate_up, down, idx = carve(w_gate, w_up, w_down, group)
    assert sorted(idx.flatten().tolist()) == list(range(80))
    x = torch.randn(10, 16, generator=gen)
    parts = sum(dense_ffn(gate_up[e, :20], gate_up[e, 20:], down[e], x) for e in range(4))
    torch.testing.assert_close(parts, dense_ffn(w_gate, w_up, w_down, x), rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_carved_router_sends_tokens_to_the_experts_that_matter(carved_model):
    model = AutoModelForCausalLM.from_pretrained(carved_model, experts_implementation="eager").eval()
    ids = torch.randint(1, model.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(1))
    for layer in model.model.layers:
        x, ex = moe_inputs(model, layer.mlp, ids), layer.mlp.experts
        norms = torch.stack(
            [dense_ffn(ex.gate_up_proj[e, :WIDTH], ex.gate_up_proj[e, WIDTH:], ex.down_proj[e], x) for e in range(4)], 1
        ).norm(dim=-1)  # [T, E]
        routed = (x @ layer.mlp.gate.weight.T).topk(2).indices  # [T, 2]
        best = norms.topk(2).indices
        overlap = (routed.unsqueeze(2) == best.unsqueeze(1)).any(2).float().sum(1).mean()
        assert overlap > 1.4  # 1.0 for a random router
        counts = torch.bincount(routed.flatten(), minlength=4)
        assert counts.min() > 0.1 * counts.sum() / 4 * 2  # every expert gets a fair share of tokens
