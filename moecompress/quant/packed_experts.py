"""Routed experts kept packed in memory and dequantized on the fly, per hit expert, on the module's device.

:class:`PackedExperts` replaces a transformers ``*Experts`` module (``gate_up_proj [E, 2I, H]``, ``down_proj
[E, H, I]``). It holds the compressed-tensors pack-quantized codes (int32) and group scales (their stored dtype) as
buffers, grouped by width: for every width ``b`` in use, ``gate_up_packed_b{b} [n_b, 2I, ceil(H b / 32)]``,
``gate_up_scale_b{b} [n_b, 2I, H / g_h]``, ``down_packed_b{b} [n_b, H, ceil(I b / 32)]``, ``down_scale_b{b}
[n_b, H, I / g_i]``; expert ``e`` is slot ``slot[e]`` of width ``bits[e]`` (any per-expert plan).

``forward`` is transformers' eager experts loop (expert kernel: ``core.experts.fused_hidden`` with the module's
own activation ``act_fn``); the only difference is that a hit expert's weights are unpacked
(:func:`moecompress.quant.pack.unpack_int32`: int32 shifts and masks, pure torch, so on CUDA it runs on the GPU)
and dequantized (:func:`moecompress.quant.rtn.dequantize`, in the scale dtype, then cast to the compute dtype) at
that moment, exactly as :func:`moecompress.quant.load.dequantize_state` does at load time: the same numbers.

On CUDA (when Triton is installed) the experts' products run instead through the fused Triton kernel of
:mod:`moecompress.quant.triton_pack`, which unpacks and dequantizes weight tiles in registers (the dense weight of
an expert is never written to memory), grouped: the rows of all hit experts of one width go through one launch per
projection. The weights are the same numbers; only the matmul's summation order differs.
``kernel`` selects: ``"auto"`` (Triton where :func:`~moecompress.quant.triton_pack.available`, else torch),
``"torch"``, ``"triton"`` (error when unavailable); :func:`set_kernel` sets it on every such module of a model.
Under ``"auto"`` a kernel that fails (e.g. Triton cannot compile for this GPU) is reported once with a warning
and the torch path takes over for the rest of the process; under ``"triton"`` the error propagates.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import nn

from moecompress.core.experts import fused_hidden, gated
from moecompress.quant import triton_pack
from moecompress.quant.pack import unpack_int32
from moecompress.quant.rtn import dequantize

KERNELS = ("auto", "torch", "triton")
_TRITON_FAILED: list[str] = []  # set once the kernel failed under "auto": the torch path is used from then on


class PackedExperts(nn.Module):
    """Routed experts of one MoE layer as packed codes + scales; weights exist only while an expert is computed.

    Build it with :meth:`from_experts`; ``forward(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])
    -> [T, H]`` has the semantics of transformers' eager experts forward.
    """

    def __init__(
        self,
        num_experts: int,
        hidden_dim: int,
        intermediate_dim: int,
        act_fn: Callable[[torch.Tensor], torch.Tensor],
        bits: Sequence[int],
        group_gate_up: int,
        group_down: int,
    ):
        super().__init__()
        if len(bits) != num_experts:
            raise ValueError(f"{len(bits)} widths for {num_experts} experts")
        self.num_experts = num_experts
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.act_fn = act_fn
        self.bits = [int(b) for b in bits]
        self.group_gate_up = group_gate_up
        self.group_down = group_down
        counts: dict[int, int] = {}
        self.slot: list[int] = []
        for b in self.bits:
            self.slot.append(counts.get(b, 0))
            counts[b] = counts.get(b, 0) + 1
        self.widths = sorted(counts)
        self.kernel = "auto"

    @classmethod
    def from_experts(
        cls,
        experts: Sequence[dict[str, tuple[torch.Tensor, torch.Tensor]]],
        bits: Sequence[int],
        act_fn: Callable[[torch.Tensor], torch.Tensor],
        device: torch.device | str = "cpu",
    ) -> PackedExperts:
        """``experts[e]``: ``{"gate"|"up"|"down": (packed int32 [R, W], scale [R, C / g])}`` as stored on disk,
        ``bits[e]`` its width. Shapes: gate/up ``[I, H]``, down ``[H, I]`` (read from the scales' group count and
        the packed width, checked against each other)."""
        E = len(experts)
        I, H = experts[0]["gate"][0].shape[0], experts[0]["down"][0].shape[0]
        g_h = H // experts[0]["gate"][1].shape[-1]
        g_i = I // experts[0]["down"][1].shape[-1]
        mod = cls(E, H, I, act_fn, bits, g_h, g_i)
        for b in mod.widths:
            members = [e for e in range(E) if mod.bits[e] == b]
            gu_p = torch.stack([torch.cat([experts[e]["gate"][0], experts[e]["up"][0]]) for e in members])
            gu_s = torch.stack([torch.cat([experts[e]["gate"][1], experts[e]["up"][1]]) for e in members])
            dn_p = torch.stack([experts[e]["down"][0] for e in members])
            dn_s = torch.stack([experts[e]["down"][1] for e in members])
            want = {
                "gate_up_packed": (len(members), 2 * I, -(-H * b // 32)),
                "gate_up_scale": (len(members), 2 * I, H // g_h),
                "down_packed": (len(members), H, -(-I * b // 32)),
                "down_scale": (len(members), H, I // g_i),
            }
            for (name, shape), t in zip(want.items(), (gu_p, gu_s, dn_p, dn_s), strict=True):
                if tuple(t.shape) != shape:
                    raise ValueError(f"{name} of the {b}-bit experts has shape {tuple(t.shape)}, expected {shape}")
                mod.register_buffer(f"{name}_b{b}", t.to(device).contiguous())
        return mod

    def logical_numel(self) -> int:
        """Weights this module stands for (gate, up and down of every expert), as a dense model counts them."""
        return 3 * self.num_experts * self.intermediate_dim * self.hidden_dim

    def extra_repr(self) -> str:
        widths = {b: self.bits.count(b) for b in self.widths}
        return f"num_experts={self.num_experts}, H={self.hidden_dim}, I={self.intermediate_dim}, widths={widths}"

    def expert_weights(self, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized ``(gate_up [2I, H], down [H, I])`` of expert ``e`` in ``dtype``, on the buffers' device
        (unpacked there)."""
        b, s = self.bits[e], self.slot[e]
        gu_q = unpack_int32(getattr(self, f"gate_up_packed_b{b}")[s], b, self.hidden_dim)  # [2I, H] int8
        gu = dequantize(gu_q, getattr(self, f"gate_up_scale_b{b}")[s], self.group_gate_up).to(dtype)
        dn_q = unpack_int32(getattr(self, f"down_packed_b{b}")[s], b, self.intermediate_dim)  # [H, I] int8
        dn = dequantize(dn_q, getattr(self, f"down_scale_b{b}")[s], self.group_down).to(dtype)
        return gu, dn

    def dense(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """All experts dequantized: ``(gate_up_proj [E, 2I, H], down_proj [E, H, I])`` (for checks, not serving)."""
        pairs = [self.expert_weights(e, dtype) for e in range(self.num_experts)]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def uses_triton(self, hidden_states: torch.Tensor) -> bool:
        """Whether ``forward`` on ``hidden_states`` runs the fused Triton kernel (see ``kernel``)."""
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")
        if self.kernel == "torch":
            return False
        ok = triton_pack.available(hidden_states) and not (self.kernel == "auto" and _TRITON_FAILED)
        if self.kernel == "triton" and not triton_pack.available(hidden_states):
            raise RuntimeError(
                "the Triton packed kernel needs Triton and a CUDA tensor (or TRITON_INTERPRET=1 on CPU): "
                f"triton installed: {triton_pack.triton_installed()}, device: {hidden_states.device}"
            )
        return ok

    def _slot_table(self, b: int, dev: torch.device) -> torch.Tensor:
        key = (b, str(dev))
        tables = self.__dict__.setdefault("_slot_tables", {})
        if key not in tables:
            t = torch.full((self.num_experts + 1,), -1, dtype=torch.long)
            for e in range(self.num_experts):
                if self.bits[e] == b:
                    t[e] = self.slot[e]
            tables[key] = t.to(dev)
        return tables[key]

    def _forward_fused(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """``forward`` through the grouped Triton kernel: per width, two launches (gate_up, down) cover every hit
        expert; rows are scheduled by expert (:func:`~moecompress.quant.triton_pack.align_rows`)."""
        T, k = top_k_index.shape
        dev = hidden_states.device
        E = self.num_experts
        flat = top_k_index.reshape(-1)  # [A] one row per (token, choice)
        tok = torch.arange(T * k, device=dev) // k  # [A]
        valid = (flat >= 0) & (flat < E)
        w_flat = top_k_weights.reshape(-1)  # [A]
        out = torch.zeros_like(hidden_states)  # [T, H]
        for b in self.widths:
            table = self._slot_table(b, dev)  # [E + 1] expert -> its slot among the b-bit experts, else -1
            slots = torch.where(valid, table[flat.clamp(0, E)], -1)  # [A]
            pos, block_slot, P = triton_pack.align_rows(slots, self.bits.count(b))
            if P == 0:
                continue
            sel = (pos >= 0).nonzero().squeeze(1)  # rows of this width
            rows = torch.full((P,), -1, dtype=torch.long, device=dev)
            rows[pos[sel]] = tok[sel]
            gate_up = triton_pack.packed_grouped_linear(
                hidden_states, rows, block_slot, getattr(self, f"gate_up_packed_b{b}"),
                getattr(self, f"gate_up_scale_b{b}"), b, self.group_gate_up,
            )  # [P, 2I]  # fmt: skip
            gate, up = gate_up.chunk(2, dim=-1)
            h = gated(self.act_fn, gate, up)  # [P, I] (padding rows hold garbage and are never read)
            rows_h = torch.full((P,), -1, dtype=torch.long, device=dev)
            rows_h[pos[sel]] = pos[sel]
            down = triton_pack.packed_grouped_linear(
                h, rows_h, block_slot, getattr(self, f"down_packed_b{b}"), getattr(self, f"down_scale_b{b}"), b,
                self.group_down,
            )  # [P, H]  # fmt: skip
            vals = down[pos[sel]] * w_flat[sel, None]  # [n, H]
            out.index_add_(0, tok[sel], vals.to(out.dtype))
        return out

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """``hidden_states [T, H]``, ``top_k_index [T, k]``, ``top_k_weights [T, k]`` -> ``[T, H]``.

        Weights are dequantized in the scale dtype and cast to ``hidden_states.dtype`` (the model's dtype)."""
        if self.uses_triton(hidden_states):
            try:
                return self._forward_fused(hidden_states, top_k_index, top_k_weights)
            except Exception as err:  # reported, then the exact torch path (same weights)
                if self.kernel == "triton":
                    raise
                _TRITON_FAILED.append(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
                warnings.warn(
                    f"moecompress: the Triton packed-experts kernel failed ({_TRITON_FAILED[0]}); "
                    "using the torch unpacking path from now on",
                    RuntimeWarning,
                    stacklevel=2,
                )
        final_hidden_states = torch.zeros_like(hidden_states)  # [T, H]
        with torch.no_grad():
            expert_mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1)  # [T, k, E+1]
            expert_mask = expert_mask.permute(2, 1, 0)  # [E+1, k, T]
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()[:, 0].tolist()
        for e in expert_hit:
            if e == self.num_experts:
                continue
            top_k_pos, token_idx = torch.where(expert_mask[e])
            current_state = hidden_states[token_idx]  # [t, H]
            gate_up, down = self.expert_weights(e, hidden_states.dtype)
            current_hidden_states = fused_hidden(current_state, gate_up, self.act_fn)  # [t, I]
            current_hidden_states = nn.functional.linear(current_hidden_states, down)  # [t, H]
            current_hidden_states = current_hidden_states * top_k_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, current_hidden_states.to(final_hidden_states.dtype))
        return final_hidden_states


def set_kernel(model: nn.Module, kernel: str) -> int:
    """Set ``kernel`` (``"auto"``, ``"torch"`` or ``"triton"``) on every :class:`PackedExperts` of ``model``;
    returns how many modules were set."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    n = 0
    for m in model.modules():
        if isinstance(m, PackedExperts):
            m.kernel = kernel
            n += 1
    return n


def module_nbytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer resident in ``module`` (meta tensors excluded; tied tensors once)."""
    seen: set[int] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.device.type == "meta" or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total
