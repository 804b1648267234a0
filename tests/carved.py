"""A tiny dense-carved MoE for tests: a Mixtral whose experts are disjoint neuron sets of one dense SwiGLU FFN.

Unlike the randomly initialized fixtures of ``conftest.py`` (independent experts, the "trained-style" kind), the
experts here are complementary pieces of one function: concatenating them gives back the dense FFN exactly, so
removing one loses information that no other expert holds (the situation of ``stories260k-moe``). Each layer's
router is fitted MoEfication-style on the layer's real inputs: least squares from the hidden state to the
standardized log norm of each expert's output, so tokens go to the experts that contribute most to them.

Use ``build_carved(folder, tokenizer_dir)`` or the ``carved_model`` fixture (import it into a test module:
``carved_model = carved.carved_model`` after ``import carved``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import MixtralConfig, MixtralForCausalLM

VOCAB = 320
HIDDEN = 48
LAYERS = 2
EXPERTS = 4
TOP_K = 2
WIDTH = 20  # per expert; the dense FFN is EXPERTS * WIDTH = 80 wide (not multiples of 16 on purpose)
ROUTER_SCALE = 2.0  # std of the fitted router logits
CLUSTER = 1.0  # weight of the shared gate direction of each neuron group (0: unstructured random FFN)


def carved_config(**over: object) -> MixtralConfig:
    base: dict[str, object] = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        max_position_embeddings=128,
        num_local_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    base.update(over)
    return MixtralConfig(**base)


def dense_ffn(w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """SwiGLU: x [T,H], w_gate/w_up [I,H], w_down [H,I] -> [T,H]."""
    return (F.silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T


def carve(w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, group: torch.Tensor):
    """Split a dense FFN into experts of disjoint neuron sets: expert e holds the neurons with group == e.

    Returns (gate_up [n, 2I, H], down [n, H, I], idx [n, I]): expert e's neuron j is dense neuron idx[e, j].
    """
    n = int(group.max()) + 1
    idx = torch.stack([torch.nonzero(group == e).flatten() for e in range(n)])  # [n, I] (equal group sizes)
    gate_up = torch.cat([w_gate[idx], w_up[idx]], dim=1)  # [n, 2I, H]
    down = w_down[:, idx].permute(1, 0, 2).contiguous()  # [n, H, I]
    return gate_up, down, idx


def fit_router(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, scale: float = ROUTER_SCALE) -> torch.Tensor:
    """Router [E,H] whose logits predict each expert's standardized log output norm on inputs x [T,H]."""
    width = down.shape[-1]
    norms = torch.stack(
        [dense_ffn(gate_up[e, :width], gate_up[e, width:], down[e], x).norm(dim=-1) for e in range(down.shape[0])], 1
    )  # [T, E]
    target = norms.clamp_min(1e-8).log()
    target = (target - target.mean(1, keepdim=True)) / target.std().clamp_min(1e-8) * scale  # [T, E]
    sol = torch.linalg.lstsq(x, target).solution  # [H, E]
    return sol.T.contiguous()


@torch.no_grad()
def moe_inputs(model: torch.nn.Module, moe: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The hidden states [T, H] that ``moe`` (a module of ``model``) receives when the model runs on ``ids``."""
    captured: list[torch.Tensor] = []
    hook = moe.register_forward_pre_hook(lambda _m, args: captured.append(args[0].reshape(-1, args[0].shape[-1])))
    try:
        model(ids)
    finally:
        hook.remove()
    return captured[0]


@torch.no_grad()
def build_carved(folder: Path, tokenizer_dir: Path, seed: int = 0, n_tokens: int = 1024, **over: object) -> Path:
    """Save a dense-carved tiny Mixtral (safetensors, config, tokenizer) into ``folder``; deterministic in ``seed``."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    cfg = carved_config(**over)
    model = MixtralForCausalLM._from_config(cfg, experts_implementation="eager").eval()
    for p in model.parameters():
        if p.dim() >= 2:
            p.normal_(0, 0.08, generator=gen)
    n_exp, hid = cfg.num_local_experts, cfg.hidden_size
    dense = n_exp * cfg.intermediate_size
    ids = torch.randint(1, cfg.vocab_size, (n_tokens // 64, 64), generator=gen)
    for layer in model.model.layers:
        moe = layer.mlp
        # neurons come in EXPERTS co-activating groups (shared gate direction), as in trained FFNs that
        # MoEfication-style carving splits by co-activation; the carve below follows the groups
        centers = torch.randn(n_exp, hid, generator=gen)
        group = torch.randperm(dense, generator=gen) % n_exp  # [dense]
        w_gate = (CLUSTER * centers[group] + torch.randn(dense, hid, generator=gen)) / hid**0.5
        w_up = torch.randn(dense, hid, generator=gen) / hid**0.5
        w_down = torch.randn(hid, dense, generator=gen) / dense**0.5
        gate_up, down, _ = carve(w_gate, w_up, w_down, group)
        moe.experts.gate_up_proj.copy_(gate_up)
        moe.experts.down_proj.copy_(down)
        x = moe_inputs(model, moe, ids)  # layers before this one are final, so these are this layer's real inputs
        moe.gate.weight.copy_(fit_router(x, gate_up, down))
    model.save_pretrained(folder)
    for f in Path(tokenizer_dir).iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


@pytest.fixture(scope="session")
def carved_model(tmp_path_factory, tokenizer_dir) -> Path:
    """The dense-carved tiny Mixtral (built once per session; treat as read-only)."""
    return build_carved(tmp_path_factory.mktemp("carved") / "carved", tokenizer_dir)
