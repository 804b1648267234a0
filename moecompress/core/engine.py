"""The one layer-streamed loop every operation runs in; operations are per-layer transforms.

    engine = Engine(ckpt, tokens, batch_size, device)
    engine.run([ProfileTransform(...), PruneTransform(...), QuantTransform(...)], emit=writer_sink)

For each decoder layer l, in order:
  1. the layer is read from the checkpoint (one layer in memory);
  2. for a MoE layer, the MoE block's inputs are captured once (the attention part only: every transform of
     this layer sees the same inputs, since transforms change only the MoE block), and each transform in turn
     gets ``transform.moe_layer(ctx)``: it reads ``ctx.inputs`` (per calibration batch, [T_b, H]) and may change
     the block in place (fewer experts, narrower experts, quantized weights) and ``ctx.replace(...)`` the hub
     tensors written for it;
  3. the (transformed) layer runs forward over the activation cache, so layer l + 1 is calibrated on the
     compressed layers 0..l (sequential calibration, as GPTQ does); transforms that asked for it see each batch's
     routed computation on the way (``observe_forward``: the profile's statistics ride this pass);
  4. ``transform.layer_done(ctx)`` (e.g. measures on the layer's outputs), then the layer's tensors go to
     ``emit`` (hub names, checkpoint order) and the layer is freed.
Only the engine reads checkpoints and only the writer writes files; transforms are pure per-layer work plus
their own bookkeeping, and each returns its manifest section from ``section()``.

Under ``torchrun`` (core/dist.py, world W > 1) every rank runs the same loop on its share of the calibration
batches (batch b on rank b % W) through the non-MoE parts and the layers' forward; at each MoE layer the captured
MoE inputs are gathered in batch order, so ``ctx.inputs`` holds exactly the single-process tokens on every rank and
a transform computes the same statistics (its per-expert work may be split with ``dist.share`` +
``dist.fill_rows_``). Observers that do not declare ``observes_split`` are shown the gathered inputs (every batch,
as in one process); those that do ride the rank's own forward and combine across ranks in ``observed``.
``engine.cache`` then indexes every batch: reading one another rank holds is a collective (every rank reads the
same batches in the same order); ``engine.stream.cache`` is this rank's own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import dist
from .checkpoint import Checkpoint
from .errors import UserError
from .experts import routed_forward
from .held import Held, park, unpark
from .interface import observing
from .memprobe import probe
from .progress import progress_bar
from .stream import LayerStream, module_state, release_freed


class _Stop(Exception):
    pass


class Transform:
    """One operation's per-layer work. Subclasses override what they need; every hook is optional.

    ``wants_inputs``: the engine captures the MoE block inputs before ``moe_layer`` (False for transforms that
    only observe the forward pass). ``observes_forward``: ``observe_forward`` is called for each batch of the
    block's routed computation, as the block is after this transform's ``moe_layer``: during the layer's forward
    when no later transform ``changes_block``, else on the captured inputs first; then ``observed``."""

    name = "transform"
    wants_inputs = True
    observes_forward = False
    observes_split = False  # under torchrun: sees only this rank's batches in the forward, combines in observed
    changes_block = True
    # reads_narrow: every read of the routed experts' fused weights upcasts what it uses, so the stream may hold
    # them in the checkpoint's dtype (bf16: half the float32 layer); the engine does so when every transform says so
    reads_narrow = False

    def start(self, engine: Engine) -> None:
        """Once, after the first layer's inputs are captured."""

    def moe_layer(self, ctx: LayerContext) -> None:
        """Change or measure MoE layer ``ctx.index`` (its inputs are ``ctx.inputs``)."""

    def observe_forward(
        self, ctx: LayerContext, batch: int, hidden: torch.Tensor, idx: torch.Tensor, w: torch.Tensor
    ) -> Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None] | None:
        """Called with one batch's MoE input [T, H] and routing (top-k index and weight [T, k]) during the
        forward (``batch``: the index among all calibration batches); may return an observer
        ``(expert, token_idx, top_k_pos, h [n, I], f [n, H])`` for ``experts.routed_forward``."""
        return None

    def observed(self, ctx: LayerContext) -> None:
        """Every batch of this layer was shown to ``observe_forward`` (the block is still as it saw it)."""

    def layer_done(self, ctx: LayerContext) -> None:
        """After the layer's forward (``ctx.engine.cache`` holds its outputs), before it is written and freed."""

    def rewrite(self, key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """Tensors to write instead of checkpoint tensor ``key`` (outside the replaced routed experts), or None
        to leave it to the next transform (and finally write it unchanged)."""
        return None

    def config(self, cfg: dict[str, Any]) -> None:
        """Update the output's config.json (expert count, widths, quantization_config) in place."""

    def section(self) -> dict[str, Any]:
        """This transform's manifest section."""
        return {}


@dataclass
class LayerContext:
    """What a transform sees of one decoder layer."""

    engine: Engine
    index: int
    layer: nn.Module  # the materialized decoder layer (changed in place by transforms)
    is_moe: bool
    inputs: list[torch.Tensor] = field(default_factory=list)  # MoE-block inputs per batch, [T_b, H]
    replaced: dict[str, torch.Tensor] | None = None  # hub tensors that replace this layer's routed keys
    extra: dict[str, Any] = field(default_factory=dict)  # what one transform leaves for a later one

    @property
    def block(self) -> nn.Module:
        return getattr(self.layer, self.engine.fam.module_block)

    @property
    def experts(self) -> nn.Module:
        return getattr(self.block, self.engine.fam.experts)

    @property
    def router(self) -> nn.Module:
        return self.engine.fam.router_of(self.block)

    def replace(self, tensors: dict[str, torch.Tensor]) -> None:
        """Write these hub-named tensors instead of the checkpoint's routed tensors (and router) of this layer."""
        self.replaced = tensors


class Engine:
    """The checkpoint streamed one decoder layer at a time over fixed calibration batches."""

    def __init__(
        self,
        ckpt: Checkpoint,
        input_ids: torch.Tensor,  # [N, S]
        batch_size: int = 8,
        device: torch.device | None = None,
        label: str = "pass",
    ):
        self.ckpt = ckpt
        self.fam = ckpt.family
        self.world, self.rank = dist.world(), dist.rank()
        self.all_batches = [b for b in input_ids.split(batch_size) if b.numel()]  # [B_b, S] each, every rank's
        if self.world > 1:
            if device is not None:
                device = dist.use_device(device)  # cuda:LOCAL_RANK
            if 0 < len(self.all_batches) < self.world:
                raise UserError(
                    f"{len(self.all_batches)} calibration batch(es) for {self.world} ranks: give at least "
                    f"{self.world} batches (--samples >= {self.world} x --batch-size) or start fewer ranks"
                )
            mine = self.all_batches[self.rank :: self.world]  # only the last batch may be short: it stays last
            input_ids = torch.cat(mine) if mine else input_ids[:0]
        self.stream = LayerStream(ckpt, input_ids, batch_size=batch_size, device=device)
        self.device = self.stream.device
        self.batch_size = batch_size
        self.label = label
        self.moe = set(ckpt.moe_layers)
        self._shared = SharedCache(self) if self.world > 1 else None
        self._replay: Replay | None = None  # the mixers' outputs moe_inputs kept for the layer's forward
        self._released: Replay | None = None  # the replay whose mixers' weights are released (this layer's)
        self.block_kwargs: list[dict[str, torch.Tensor]] = []  # moe_inputs' per-batch keyword inputs of the block

    @property
    def cache(self) -> Any:
        """Every batch's hidden states (under torchrun a ``SharedCache`` over the ranks' own caches)."""
        return self._shared if self._shared is not None else self.stream.cache

    @property
    def batches(self) -> list[torch.Tensor]:
        """Every calibration batch's token ids [B_b, S] (all ranks' under torchrun)."""
        return self.all_batches

    def global_batch(self, i: int) -> int:
        """Index among all batches of this rank's cached batch ``i``."""
        return i * self.world + self.rank

    def gather_batches(self, local: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-batch tensors [T_b, ...] of this rank's batches -> every batch's, in batch order (exact; a collective
        under torchrun, the identity otherwise). Batch b holds B_b x S rows (the tokens of batch b)."""
        if self.world == 1 or not self.all_batches:
            return local
        n, ref = len(self.all_batches), local[0]
        rows = [b.numel() for b in self.all_batches]
        buf = torch.zeros((n, max(rows), *ref.shape[1:]), dtype=ref.dtype, device=ref.device)  # [nb, T_max, ...]
        for i, t in enumerate(local):
            buf[self.global_batch(i), : t.shape[0]] = t
        dist.fill_rows_(buf, n)
        return [buf[b, : rows[b]] for b in range(n)]

    @property
    def model(self) -> nn.Module:
        return self.stream.model

    def moe_inputs(self, layer: nn.Module) -> list[torch.Tensor]:
        """The MoE block's inputs [T_b, H] for every batch (the layer runs up to its MoE block only; this rank's
        batches, gathered in batch order under torchrun: a collective).

        The outputs of the layer's mixers that ran before the block (attention, Mamba: children holding matrices) are
        kept for the layer's forward, which then replays them instead of running them again (``Replay``), unless the
        activation cache is spilled to disk (they are the cache's size)."""
        xs: list[torch.Tensor] = []
        block = getattr(layer, self.fam.module_block)
        n = len(self.stream.cache)
        prior = self._replay if self._replay is not None and self._replay.layer is layer else None
        if prior is not None and not prior.complete(n):
            prior = None
        # a second call on the layer (a transform dropped ctx.inputs) replays the recorded mixers: they may be released
        spilled = getattr(self.stream.cache, "spilled", False)
        replay = Replay(layer, block) if prior is None and not spilled else None

        kws: list[dict[str, torch.Tensor]] = []  # per batch: the block's per-token keyword inputs, as [1, T_b, ...]

        def hook(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            h = args[0] if args else kwargs["hidden_states"]
            xs.append(h.detach().reshape(-1, h.shape[-1]))
            kws.append({  # DeepSeek-V4's hash-routed blocks take the input ids: mlp(x, input_ids=input_ids)
                k: v.detach().reshape(1, -1, *v.shape[h.dim() - 1 :]) for k, v in kwargs.items()
                if k != "hidden_states" and torch.is_tensor(v) and v.shape[: h.dim() - 1] == h.shape[:-1]
            })  # fmt: skip
            raise _Stop

        handle = block.register_forward_pre_hook(hook, with_kwargs=True)
        if prior is None:
            self._replay = None
        try:
            with torch.no_grad(), replay.recording() if replay is not None else nullcontext():
                for i in range(n):
                    try:
                        with prior.playing(i, keep=True) if prior is not None else nullcontext():
                            self.stream.run_layer(layer, i)
                    except _Stop:
                        pass
                    if replay is not None:
                        replay.batch_done()
        finally:
            handle.remove()
        if replay is not None and replay.complete(n):
            self._replay = replay
            self._release_mixers(replay)
            replay.park()  # the transforms work next: the recording waits for the forward (in files past a size)
        names = sorted(kws[0]) if kws else []
        parts = [self.gather_batches([kw[n] for kw in kws]) for n in names]
        self.block_kwargs = [dict(zip(names, vals, strict=True)) for vals in zip(*parts, strict=True)]
        return self.gather_batches(xs)

    def _release_mixers(self, replay: Replay) -> None:
        """The replayed mixers' weights (the layer's attention, in the stream's dtype: 0.51 GB float32 at DeepSeek-V3
        dims) are idle once their outputs are recorded: they go to meta for the rest of the layer's transforms. A
        mixer called outside a replay (a probe running the whole layer in ``emit``) reads its weights back from the
        checkpoint first (the same values: the same tensors cast the same way)."""
        stream, fam = self.stream, self.fam
        l = next(j for j, m in enumerate(stream.decoder_layers) if m is replay.layer)
        prefix = f"model.layers.{l}."

        def restore(name: str, module: nn.Module) -> None:
            keys = [
                k for k in self.ckpt.keys()
                if k.startswith(prefix) and fam.disk_to_module(k)[len(prefix) :].startswith(f"{name}.")
            ]  # fmt: skip
            state = module_state(fam, self.ckpt.read(keys), l, None)
            stream._materialize(module, {k[len(name) + 1 :]: v for k, v in state.items()}, f"layer {l} {name}")

        replay.release(restore)
        self._released = replay
        release_freed()
        probe(f"layer {l}: mixers released")

    def _observing(self, ctx: LayerContext, observers: list[Transform], batch: int) -> Callable[..., torch.Tensor]:
        """An experts forward for batch ``batch``: the eager computation, with the observers' hooks. The block
        calls it through transformers' ``ExpertsInterface`` (``core.interface``: the registered "moecompress"
        implementation), or as the experts' replaced forward where the module does not dispatch there."""
        experts = ctx.experts

        def fwd(hidden: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            obs = [o.observe_forward(ctx, batch, hidden, idx, w) for o in observers]
            obs = [o for o in obs if o is not None]

            def observe(*a: Any) -> None:
                for o in obs:
                    o(*a)

            return routed_forward(
                experts.gate_up_proj, experts.down_proj, experts.act_fn, hidden, idx, w, observe if obs else None
            )

        return fwd

    @torch.no_grad()
    def forward(self, ctx: LayerContext, observers: list[Transform]) -> None:
        """Run the layer over the cache (replacing it by the outputs); observers see each batch's routing. When
        ``moe_inputs`` ran on this layer, its mixers' outputs are replayed (they do not depend on the MoE block, the
        only part transforms change) and ``ctx.inputs`` is released first (the replay takes its place in memory)."""
        replay, self._replay = self._replay, None
        if replay is not None and (replay.layer is not ctx.layer or not replay.complete(len(self.stream.cache))):
            replay = None
        if replay is not None:
            ctx.inputs = []
        cache = self.stream.cache
        for i in range(len(cache)):
            with replay.playing(i) if replay is not None else nullcontext():
                if not observers or not self.observes(i):
                    cache[i] = self.stream.run_layer(ctx.layer, i)
                    continue
                with observing(ctx.experts, self._observing(ctx, observers, self.global_batch(i))):
                    cache[i] = self.stream.run_layer(ctx.layer, i)
        for o in observers:
            o.observed(ctx)

    def observes(self, i: int) -> bool:
        """Whether the transforms see local batch ``i`` (all do here; budget's HeldOutEngine hides its judge
        windows)."""
        return True

    @torch.no_grad()
    def observe_inputs(self, ctx: LayerContext, observers: list[Transform]) -> None:
        """Show the observers the MoE block as it is now, on the captured inputs (the block runs with its own
        routing; its output is dropped): used when a later transform changes the block before the forward."""
        experts = ctx.experts
        for i, x in enumerate(ctx.inputs):
            with observing(experts, self._observing(ctx, observers, i)):
                ctx.block(x.unsqueeze(0), **(self.block_kwargs[i] if i < len(self.block_kwargs) else {}))
        for o in observers:
            o.observed(ctx)

    def layers(self, transforms: list[Transform]) -> Iterator[LayerContext]:
        """Drive ``transforms`` over every layer; yields each finished layer's context before it is freed."""
        stream = self.stream
        stream.narrow = bool(transforms) and all(t.reads_narrow for t in transforms)
        n_layers = len(stream.decoder_layers)
        with progress_bar() as bar:
            task = bar.add_task(f"{self.label}: embed", total=n_layers + 1)
            stream.capture()
            bar.advance(task)
            for t in transforms:
                t.start(self)
            for l, layer in stream.layers():
                self._replay = None
                bar.update(task, description=f"{self.label}: layer {l + 1}/{n_layers}")
                ctx = LayerContext(self, l, layer, l in self.moe)
                pending: list[Transform] = []  # observers that can still ride the forward pass
                if ctx.is_moe:
                    if any(t.wants_inputs for t in transforms):
                        ctx.inputs = self.moe_inputs(layer)
                    for t in transforms:
                        if pending and t.changes_block:  # the observers see the block before t changes it
                            if not ctx.inputs:
                                ctx.inputs = self.moe_inputs(layer)
                            self.observe_inputs(ctx, pending)
                            pending = []
                        t.moe_layer(ctx)
                        if t.observes_forward:
                            pending.append(t)
                    whole = [t for t in pending if not t.observes_split] if self.world > 1 else []
                    if whole:  # under torchrun: every batch, as one process sees them, on the gathered inputs
                        if not ctx.inputs:
                            ctx.inputs = self.moe_inputs(layer)
                        self.observe_inputs(ctx, whole)
                        pending = [t for t in pending if t not in whole]
                self.forward(ctx, pending)
                if ctx.is_moe:
                    for t in transforms:
                        t.layer_done(ctx)
                yield ctx
                # the finished layer's context (its written tensors, inputs) is not held while the next layer is
                # read and computed: one pruned 30B-shaped layer's experts were 0.55 GB over the next layer's peak
                del ctx
                if self._released is not None:  # the layer is freed next: its released mixers stay released
                    self._released.unhook()
                    self._released = None
                bar.advance(task)

    def run(self, transforms: list[Transform], emit: Callable[[LayerContext], None] | None = None) -> None:
        """One pass: every layer through every transform; ``emit`` gets each finished layer (e.g. the writer)."""
        try:
            for ctx in self.layers(transforms):
                if emit is not None:
                    emit(ctx)
                del ctx  # (see layers: the loop variable would hold it through the next layer)
        finally:
            self.close()

    def close(self) -> None:
        self.stream.close()


class Replay:
    """The outputs of a decoder layer's mixers (its children holding matrices, attention or Mamba, that run before
    the MoE block) on every cached batch, recorded while ``Engine.moe_inputs`` runs the layer up to its block and
    returned by those children when the engine runs the layer forward over the same batches: the forward computes
    only the MoE block and what follows it. Exact: a mixer's output depends on the layer's input only (the same
    cached batch), never on the block. A mixer called more or less than once per batch disables the replay."""

    def __init__(self, layer: nn.Module, block: nn.Module):
        self.layer = layer
        self.mixers = {
            name: child for name, child in layer.named_children()
            if child is not block and any(p.dim() >= 2 for p in child.parameters())
        }  # fmt: skip
        self.outputs: dict[str, list[Any]] = {name: [] for name in self.mixers}
        self._calls: dict[str, int] = dict.fromkeys(self.mixers, 0)
        self.ok = bool(self.mixers)
        self.batches = 0
        self._playing = False
        self._hooks: list[Any] = []

    @contextmanager
    def recording(self) -> Iterator[None]:
        def keep(name: str) -> Callable[..., None]:
            def hook(_m: Any, _args: Any, out: Any) -> None:
                self._calls[name] += 1
                self.outputs[name].append(_cloned(out))  # a copy: the layer may change its output in place

            return hook

        handles = [m.register_forward_hook(keep(name)) for name, m in self.mixers.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def batch_done(self) -> None:
        """One batch ran up to the block: each mixer that ran, ran once (a mixer after the block never runs)."""
        self.batches += 1
        for name, n in self._calls.items():
            if n > 1:
                self.ok = False
            if n == 0:  # runs after the block (or not at all): not replayed
                self.outputs[name].clear()
            self._calls[name] = 0
        self.outputs = {k: v for k, v in self.outputs.items() if len(v) == self.batches}

    def complete(self, batches: int) -> bool:
        """Every mixer kept holds an output for each of ``batches`` batches."""
        return self.ok and bool(self.outputs) and self.batches == batches

    def park(self) -> None:
        """While the layer's transforms work (the recording is read again only by the layer's forward, or a second
        ``Engine.moe_inputs``): each recorded tensor past ``held.PARK_BYTES`` waits in a temporary file (on the
        CPU; the size of the activation cache: 117 MB at H 7168 and 4,096 tokens); ``playing`` brings a batch back
        when it is replayed. The same values, bit for bit."""
        self.outputs = {name: [_mapped(park, o) for o in outs] for name, outs in self.outputs.items()}

    @contextmanager
    def playing(self, i: int, keep: bool = False) -> Iterator[None]:
        """The mixers return batch ``i``'s recorded outputs (and forget them: each batch is replayed once; with
        ``keep`` they return a copy and the recording stays, for a second ``Engine.moe_inputs`` on the layer)."""
        own = {name: vars(self.mixers[name]).get("forward") for name in self.outputs}  # an instance's own forward
        for name, outs in self.outputs.items():
            out = _played(outs[i], keep)
            if not keep:
                outs[i] = None
            self.mixers[name].forward = lambda *a, _out=out, **k: _out
        self._playing = True
        try:
            yield
        finally:
            self._playing = False
            for name, f in own.items():
                if f is None:
                    del self.mixers[name].forward
                else:
                    self.mixers[name].forward = f

    def release(self, restore: Callable[[str, nn.Module], None]) -> None:
        """Move the replayed mixers' parameters to meta (their buffers stay); a mixer called while no batch is being
        replayed calls ``restore(name, mixer)`` first, which must give it its parameters back."""
        for name in self.outputs:
            mixer = self.mixers[name]
            for m in mixer.modules():
                for pname, p in list(m._parameters.items()):
                    if p is not None and p.device.type != "meta":
                        m._parameters[pname] = nn.Parameter(
                            torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=p.requires_grad
                        )

            def hook(_m: Any, _args: Any, _name: str = name, _mixer: nn.Module = mixer) -> None:
                if not self._playing and any(p.device.type == "meta" for p in _mixer.parameters()):
                    restore(_name, _mixer)

            self._hooks.append(mixer.register_forward_pre_hook(hook))

    def unhook(self) -> None:
        """Remove ``release``'s restoring hooks (the layer is being freed)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []


def _mapped(fn: Callable[[Any], Any], out: Any) -> Any:
    """``out`` (a module's output: a tensor, tuples / lists of them and other things) with ``fn`` applied to each
    tensor (or ``Held``) in it."""
    if isinstance(out, (torch.Tensor, Held)):
        return fn(out)
    if isinstance(out, (tuple, list)):
        return type(out)(_mapped(fn, o) for o in out)
    return out


def _cloned(out: Any) -> Any:
    return _mapped(lambda t: t.detach().clone(), out)


def _played(out: Any, keep: bool) -> Any:
    """A recorded output to replay: parked tensors back in memory (``unpark``: already a copy of the file), the
    others as recorded, or with ``keep`` a copy (the recording stays for a second replay)."""

    def one(x: torch.Tensor | Held) -> torch.Tensor:
        if isinstance(x, Held) and x.spilled:
            return unpark(x)
        t = x.t if isinstance(x, Held) else x
        return t.detach().clone() if keep else t

    return _mapped(one, out)


class SharedCache:
    """The activation cache of every batch under torchrun: batch b lives on rank b % world. Reading batch b is a
    collective (rank b % world broadcasts it): every rank must read the same batches in the same order. Read-only."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def __len__(self) -> int:
        return len(self.engine.all_batches)

    def __getitem__(self, b: int) -> torch.Tensor:
        eng, w = self.engine, self.engine.world
        if not 0 <= b < len(self):
            raise IndexError(b)
        local = eng.stream.cache
        if b % w == eng.rank:
            t = local[b // w].to(eng.device)
        else:
            mine = local[0]  # [B, S, H]: every rank holds at least one batch
            t = torch.empty((eng.all_batches[b].shape[0], *mine.shape[1:]), dtype=mine.dtype, device=eng.device)
        return dist.broadcast_(t, b % w)
