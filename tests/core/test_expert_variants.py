"""Experts whose math is not act(g) * u (issue 12): a family's own gated activation (transformers' ``_apply_gate``
override: Beam, GLM-5-Next, MiniMax-M3) runs as ``core.experts.GatedActivation`` / ``GatedExperts``, the family's
own code called on [g | u]. Checked against each family's real transformers experts module, through every kernel
helper the operations use, and end to end on a tiny Beam model (open, view -> write, profile = brute force,
prune = the base model with those experts masked out of routing, quantize loads in plain transformers, atom, info,
eval, load); a gate that mixes channels or does not map 0 to 0 is refused in one line."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers.integrations.moe import use_experts_implementation

from moecompress.core.errors import UserError
from moecompress.core.experts import (
    GatedActivation,
    GatedExperts,
    expert_hidden,
    expert_outputs,
    experts_activation,
    fused_hidden,
    gated,
    own_gate,
    routed_forward,
)
from moecompress.prune.order import outputs_by_token

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "families"))

E, H, I = 4, 16, 12


def _experts(model_type: str, dtype: torch.dtype = torch.float32, limit: float = 1.5) -> nn.Module:
    """The family's real transformers experts module, small, with random weights (the clamps of its gate reached)."""
    if model_type == "beam":
        from transformers.models.beam.configuration_beam import BeamConfig as Cfg
        from transformers.models.beam.modeling_beam import BeamExperts as Cls
    elif model_type == "glm5_next":
        from transformers.models.glm5_next.configuration_glm5_next import Glm5NextTextConfig as Cfg
        from transformers.models.glm5_next.modeling_glm5_next import Glm5NextTextExperts as Cls
    else:
        from transformers.models.minimax_m3_vl.configuration_minimax_m3_vl import MiniMaxM3VLTextConfig as Cfg
        from transformers.models.minimax_m3_vl.modeling_minimax_m3_vl import MiniMaxM3VLExperts as Cls
    cfg = Cfg()
    small = dict(num_experts=E, num_local_experts=E, n_routed_experts=E, hidden_size=H, moe_intermediate_size=I)
    for k, v in (small | dict(intermediate_size=I, swiglu_limit=limit, hidden_act="silu")).items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    ex = Cls(cfg)
    with torch.no_grad():
        ex.gate_up_proj.normal_(0, 0.6)
        ex.down_proj.normal_(0, 0.3)
    return ex.to(dtype).eval()


def _routing(T: int = 24, k: int = 2, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(T, H, generator=g) * 1.5).to(dtype)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])  # [T, k] distinct experts
    w = torch.rand(T, k, generator=g).to(dtype)
    return x, idx, w


def _ours(ex: nn.Module) -> GatedExperts:
    mod = GatedExperts(E, H, I, own_gate(ex, "test"))
    mod.gate_up_proj = nn.Parameter(ex.gate_up_proj.detach().clone(), requires_grad=False)
    mod.down_proj = nn.Parameter(ex.down_proj.detach().clone(), requires_grad=False)
    return mod


def _plain(ex: nn.Module, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The same experts computed as SwiGLU, act(g) * u: what the family does NOT compute."""
    return routed_forward(ex.gate_up_proj, ex.down_proj, nn.functional.silu, x, idx, w)


CASES = [("beam", torch.bfloat16), ("glm5_next", torch.float32), ("minimax_m3_vl", torch.float32)]


@pytest.mark.parametrize(("model_type", "dtype"), CASES)
def test_own_gate_computes_what_the_family_experts_module_computes(model_type, dtype):
    """GatedExperts (the stream's module) equals the family's eager forward; plain SwiGLU does not (Beam: its gate
    runs in float32 under bf16 weights; GLM-5-Next: clamps; MiniMax-M3: (clamp(u) + 1) * g sigmoid(alpha g))."""
    ex = _experts(model_type, dtype)
    x, idx, w = _routing(dtype=dtype)
    with torch.no_grad():
        want = ex(x, idx, w)
        got = _ours(ex)(x, idx, w)
        plain = _plain(ex, x, idx, w)
    assert isinstance(experts_activation(ex), GatedActivation)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert torch.allclose(got.float(), want.float(), rtol=0, atol=tol), float((got - want).abs().max())
    assert float((plain.float() - want.float()).abs().max()) > 10 * tol, "the gate changes nothing: cannot fail"


@pytest.mark.parametrize("model_type", ["glm5_next", "minimax_m3_vl"])
def test_every_kernel_helper_applies_the_family_gate(model_type):
    """fused_hidden, expert_hidden, expert_outputs, outputs_by_token and routed_forward's observer give the module's
    own h = _apply_gate(W_gate_up x) and f = W_down h, expert by expert."""
    ex = _experts(model_type)
    act = own_gate(ex)
    x, idx, w = _routing()
    gu, dn = ex.gate_up_proj.detach(), ex.down_proj.detach()
    with torch.no_grad():
        h_ref = torch.stack([ex._apply_gate(nn.functional.linear(x, gu[e])) for e in range(E)])  # [E, T, I]
        f_ref = torch.einsum("eti,ehi->eth", h_ref, dn)  # [E, T, H]
        for e in range(E):
            assert torch.allclose(fused_hidden(x, gu[e], act), h_ref[e], atol=1e-6)
            assert torch.allclose(expert_hidden(x, gu[e, :I], gu[e, I:], act), h_ref[e], atol=1e-6)
        assert torch.allclose(expert_outputs(gu, dn, act, x), f_ref, atol=1e-5)
        assert torch.allclose(outputs_by_token(x, gu[:, :I], gu[:, I:], dn, act), f_ref.transpose(0, 1), atol=1e-5)
        seen = {}

        def observe(e, tok, pos, h, f):
            seen[e] = (tok, h, f)

        routed_forward(gu, dn, act, x, idx, w, observe)
    for e, (tok, h, f) in seen.items():
        assert torch.allclose(h, h_ref[e, tok], atol=1e-6) and torch.allclose(f, f_ref[e, tok], atol=1e-5)
    assert seen and not torch.allclose(gated(nn.functional.silu, gu[0, :I] @ x.T, gu[0, I:] @ x.T).T, h_ref[0])


def test_channel_removal_and_zero_padding_are_exact_under_an_own_gate():
    """The gate is channel-wise: keeping channels K of gate, up, down gives exactly those channels' contribution, and
    zero channels (atom's padding) add nothing."""
    ex = _experts("minimax_m3_vl")
    act = own_gate(ex)
    x, _, _ = _routing()
    gate, up, down = ex.gate_up_proj[0, :I].detach(), ex.gate_up_proj[0, I:].detach(), ex.down_proj[0].detach()
    keep = torch.tensor([0, 3, 4, 9])
    with torch.no_grad():
        h = expert_hidden(x, gate, up, act)  # [T, I]
        cut = expert_hidden(x, gate[keep], up[keep], act) @ down[:, keep].T
        pad = torch.zeros(3, H)
        padded = expert_hidden(x, torch.cat([gate[keep], pad]), torch.cat([up[keep], pad]), act)
    assert torch.allclose(cut, h[:, keep] @ down[:, keep].T, atol=1e-6)
    assert torch.equal(padded[:, len(keep) :], torch.zeros_like(padded[:, len(keep) :]))


@use_experts_implementation
class _MixingExperts(nn.Module):
    """A gate that normalizes over the channels (h_j depends on every channel): not channel-wise."""

    def __init__(self, config):
        super().__init__()
        self.num_experts = E
        self.gate_up_proj = nn.Parameter(torch.zeros(E, 2 * I, H))
        self.down_proj = nn.Parameter(torch.zeros(E, H, I))
        self.act_fn = nn.SiLU()

    def forward(self, hidden_states, top_k_index, top_k_weights):
        raise NotImplementedError

    def _apply_gate(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return torch.softmax(gate, dim=-1) * up


@use_experts_implementation
class _OffsetExperts(_MixingExperts):
    """A gate with sigmoid(g) * (u + 1): 0.5 on a zero channel (atom padding would not vanish)."""

    def _apply_gate(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return torch.sigmoid(gate) * (up + 1)


@pytest.mark.parametrize(("cls", "reason"), [(_MixingExperts, "mixes channels"), (_OffsetExperts, "zero channel")])
def test_a_gate_that_is_not_channel_wise_is_refused_with_its_reason(cls, reason):
    from transformers import PretrainedConfig

    ex = cls(PretrainedConfig())
    with pytest.raises(ValueError, match=reason):
        own_gate(ex)
    with pytest.raises(ValueError, match=reason):
        experts_activation(ex)


def test_code_that_multiplies_act_g_by_u_itself_is_refused_not_silently_wrong():
    act = own_gate(_experts("glm5_next"), "glm5_next")
    with pytest.raises(UserError, match="own gated activation"):
        act(torch.zeros(2, I))


def test_beam_derives_its_own_gate_and_round_trips(tmp_path, tokenizer_dir):
    from family_checks import run_checks

    r = run_checks("beam", tmp_path, tokenizer_dir, ops=("view_write", "prune"))
    assert r["supported"] and r["ops"] == {"open": "ok", "view_write": "ok", "prune": "ok"}, r
    from moecompress.core.checkpoint import Checkpoint

    ck = Checkpoint(tmp_path / "beam")
    assert ck.family.gate == "apply_gate" and ck.family.own_experts


@pytest.mark.slow
@pytest.mark.parametrize("gate", ["own", "glm5_next", "minimax_m3_vl"])
def test_beam_every_operation_follows_the_experts_gate(gate, tmp_path, tokenizer_dir, monkeypatch):
    """Every family check on a tiny Beam model; with Beam's _apply_gate replaced by GLM-5-Next's or MiniMax-M3's
    (their real code, their clamps reached), so profile statistics (brute force through the module's own gate),
    prune (masked-routing logits), quantize (loads in transformers), atom, eval and load follow the gate the module
    runs, not SwiGLU."""
    from family_checks import EXTRA_OPS, OPS, run_checks
    from transformers.models.beam.modeling_beam import BeamExperts

    if gate != "own":
        other = type(_experts(gate))
        monkeypatch.setattr(BeamExperts, "_apply_gate", other._apply_gate)
        monkeypatch.setattr(BeamExperts, "swiglu_limit", 0.3, raising=False)  # reached by the tiny model's values
        monkeypatch.setattr(BeamExperts, "swiglu_alpha", 1.702, raising=False)
    r = run_checks("beam", tmp_path, tokenizer_dir, ops=OPS + EXTRA_OPS)
    merge = r["ops"].pop("merge")
    assert set(r["ops"].values()) == {"ok"}, r
    assert merge == "ok", merge  # its routing is verified by behaviour (core.routing_check)


def test_packed_experts_of_moecompress_load_apply_the_family_gate():
    """``moecompress.load``'s PackedExperts (mixed-width quantized outputs) get ``experts_activation`` of the
    transformers module: the family's own gate, so they equal GatedExperts on the dequantized weights."""
    from moecompress.quant.pack import pack_int32
    from moecompress.quant.packed_experts import PackedExperts
    from moecompress.quant.rtn import rtn_quantize

    ex = _experts("minimax_m3_vl")
    bits = [4, 8, 4, 3]
    stored = []
    for e, b in enumerate(bits):
        entry = {}
        for name, w in (("gate", ex.gate_up_proj[e, :I]), ("up", ex.gate_up_proj[e, I:]), ("down", ex.down_proj[e])):
            q, s = rtn_quantize(w.detach(), b, group_size=4)
            entry[name] = (pack_int32(q, b), s)
        stored.append(entry)
    packed = PackedExperts.from_experts(stored, bits, experts_activation(ex))
    ours = _ours(ex)  # the same dequantized weights, run as GatedExperts
    gu, dn = zip(*(packed.expert_weights(e, torch.float32) for e in range(E)), strict=True)
    ours.gate_up_proj.data, ours.down_proj.data = torch.stack(gu), torch.stack(dn)
    x, idx, w = _routing()
    with torch.no_grad():
        got, want = packed(x, idx, w), ours(x, idx, w)
        plain = PackedExperts.from_experts(stored, bits, nn.functional.silu)(x, idx, w)
    assert torch.allclose(got, want, atol=1e-6), float((got - want).abs().max())
    assert float((plain - want).abs().max()) > 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("model_type", ["glm5_next", "minimax_m3_vl"])
def test_own_gate_on_cuda_equals_the_family_forward(model_type):
    """The own gate keeps tensors on the data's device (its probe runs on CPU scalars only)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    ex = _experts(model_type).cuda()
    x, idx, w = (t.cuda() for t in _routing())
    with torch.no_grad():
        want, got = ex(x, idx, w), _ours(ex).cuda()(x, idx, w)
    assert got.device.type == "cuda" and torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
