"""The one writer of compressed model folders, fed layer by layer while the engine runs.

    with Output(job.out, job.overwrite) as out:           # a temporary folder beside the output
        out.add_globals(ckpt, transforms)                # embeddings, final norm, lm_head
        engine.run(transforms, emit=out.add_layer)       # each finished decoder layer, then it is freed
        out.finish(ckpt, config, manifest, transforms)   # config.json, side files, moecompress.json, report
    # the folder is renamed into place only when complete; on any error the temporary is removed

A layer's tensors are the checkpoint's (hub names, checkpoint order) except its routed experts and router when a
transform called ``ctx.replace(...)``; every tensor written passes through the transforms' ``rewrite`` (e.g.
quantizing attention weights to --other-bits).
Under torchrun only rank 0 writes: on the other ranks ``tmp`` is a private scratch folder (removed at the end) and
nothing is added; ``finish`` returns on every rank once rank 0 has renamed the folder into place.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from . import dist
from .checkpoint import Checkpoint
from .engine import LayerContext, Transform
from .manifest import Manifest
from .writer import ShardWriter, dir_bytes, finish_temp, layer_flush_bytes, take_temp


class Output:
    def __init__(
        self,
        out: Path,
        overwrite: bool = False,
        max_shard_bytes: int | None = None,
        layer_flush_bytes: int | None = None,
    ):
        """``layer_flush_bytes``: a shard is written at the end of a layer once this much is buffered (default
        writer.layer_flush_bytes(): 256 MiB or a sixteenth of --max-memory), so the writer holds at most that
        while the next layer is computed; shards also end before passing ``max_shard_bytes``."""
        self.out, self.overwrite = Path(out), overwrite
        self.tmp: Path | None = None
        self._max = max_shard_bytes
        self._layer_flush = layer_flush_bytes
        self.shards: ShardWriter | None = None
        self.transforms: Sequence[Transform] = ()
        self._disk_key: Any = lambda key: key
        self._disk_items: Any = lambda key, t: [(key, t)]

    def __enter__(self) -> Output:
        self.main = dist.is_main()
        if not self.main:  # rank 0 writes; side files the command puts into tmp land in a scratch folder
            self.tmp = Path(tempfile.mkdtemp(prefix=f"moecompress-rank{dist.rank()}-"))
            return self
        self.tmp = take_temp(self.out.expanduser().resolve(), "dir")
        self.shards = ShardWriter(self.tmp, self._max) if self._max else ShardWriter(self.tmp)
        if self._layer_flush is None:
            self._layer_flush = layer_flush_bytes()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if (exc_type is not None or not self.main) and self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def add(self, key: str, t: torch.Tensor, load: Callable[[], torch.Tensor] | None = None) -> None:
        """Write ``t`` as checkpoint tensor ``key`` (rewritten by the transforms); ``load``: ``t`` can be read again,
        so when it is written unchanged the writer reads it when its shard is written instead of holding it."""
        if self.shards is None:  # not rank 0
            return
        for k, v in self._rewritten(key, t, 0):
            for dk, dv in self._disk_items(k, v):  # (Kimi-Linear's conv1d: the disk tensors it is made of)
                self.shards.add(dk, dv, load if dv is t else None)

    def _rewritten(self, key: str, t: torch.Tensor, start: int) -> list[tuple[str, torch.Tensor]]:
        """What to write for tensor ``key``: the first transform from ``start`` on whose ``rewrite`` takes it, each
        tensor it returns passed on to the later transforms (atom's zero-padded shared experts, then quantized)."""
        for i in range(start, len(self.transforms)):
            new = self.transforms[i].rewrite(key, t)
            if new is not None:
                return [kv for k, v in new.items() for kv in self._rewritten(k, v, i + 1)]
        return [(key, t)]

    def add_globals(self, ckpt: Checkpoint, transforms: Sequence[Transform] = ()) -> None:
        """Every tensor outside the decoder layers (embeddings, final norm, lm_head), in checkpoint order. Those no
        transform rewrites are read again from the checkpoint when their shard is written (with the first layer's,
        below the layer flush size): the writer does not hold them, nor their mapped pages, through the pass."""
        self.transforms = transforms
        self._disk_key = ckpt.disk_key  # a multimodal wrapper's language model is written under its own names
        self._disk_items = ckpt.disk_writer(transforms)  # (a quantized output keeps Kimi-Linear's conv1d whole)
        if self.shards is None:
            return
        keys = [k for k in ckpt.keys() if not k.startswith("model.layers.")]
        for k, t in ckpt.read(keys).items():  # each shard opened once; read again when their shard is written
            self.add(k, t, lambda k=k: ckpt.read([k])[k])
        self.shards.boundary(self._layer_flush or 0)

    def add_layer(self, ctx: LayerContext) -> None:
        """Decoder layer ``ctx.index`` as the transforms left it."""
        if self.shards is None:
            return
        ckpt, l = ctx.engine.ckpt, ctx.index
        pat = ckpt.family.routed_key_pattern(l) if ctx.replaced is not None else None
        keys = [k for k in ckpt.keys() if k.startswith(f"model.layers.{l}.") and (pat is None or not pat.match(k))]
        for k, t in ckpt.read(keys).items():  # each shard opened once, checkpoint order
            self.add(k, t)
        for k, t in (ctx.replaced or {}).items():  # already final: no rewrite
            self.shards.add(self._disk_key(k), t)
        self.shards.boundary(self._layer_flush or 0)  # the next layer is computed without this one's output held

    def finish(
        self,
        ckpt: Checkpoint,
        config: dict[str, Any],
        manifest: Manifest,
        extra_json: dict[str, Any] | None = None,
        side_files: Iterable[Path] | None = None,
        report_inputs: Sequence[Path] = (),
        report: bool = True,
        elapsed: float | None = None,
    ) -> Path:
        """config.json, tokenizer and side files, sidecars, moecompress.json, report.html; then the rename."""
        if self.shards is None:  # not rank 0: wait until rank 0 has written the folder, take its figures
            dist.barrier()
            self._written(manifest, elapsed)
            return self.out
        assert self.tmp is not None
        tmp = self.tmp
        self.shards.close()
        config = ckpt.output_config(config, manifest.layout)  # a multimodal wrapper: its config, text_config changed
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for f in side_files if side_files is not None else ckpt.side_files():
            shutil.copy2(f, tmp / f.name)
        for name, obj in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
        manifest.params_after = self.shards.params
        manifest.bytes_after = dir_bytes(tmp)
        if elapsed is not None:
            manifest.elapsed_s = round(elapsed, 2)
        manifest.write(tmp)
        if report:
            from ..report import write_report

            write_report(tmp, [Path(p) for p in report_inputs])
        dist.barrier()  # under torchrun: every rank has checked the output (its guard) before the folder appears
        finish_temp(self.out.expanduser().resolve(), tmp, self.overwrite)
        self._written(manifest, elapsed)
        return self.out

    def _written(self, manifest: Manifest, elapsed: float | None) -> None:
        """Under torchrun: every rank returns once rank 0 has renamed the folder into place, its manifest holding
        rank 0's written parameters and bytes (a no-op in one process)."""
        if dist.world() == 1:
            return
        figures = torch.tensor([manifest.params_after or 0, manifest.bytes_after or 0], dtype=torch.long)
        dist.broadcast_(figures, 0)
        manifest.params_after, manifest.bytes_after = int(figures[0]), int(figures[1])
        if elapsed is not None:
            manifest.elapsed_s = round(elapsed, 2)
