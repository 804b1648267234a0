"""Per-phase peak resident memory of HEAPr atom pruning (``prune --granularity atom``), in one process.

    OMP_NUM_THREADS=1 .venv/bin/python bench/atom_phase_probe.py MODEL OUT.jsonl [moecompress prune args ...]

Wraps the atom pipeline's phases (the profile pass, the gradient pass's forward, head gradients, each layer's
backward, the scores and their per-expert quadratic forms, the writing pass) and writes one JSON line per call:
``peak`` is the VmHWM while the call ran (reset with /proc/self/clear_refs on entry; nested calls fold their peak
into their callers'), ``rss_in`` / ``rss_out`` / ``anon_out`` / ``file_out`` the resident bytes at entry and exit, and
``cpu_s`` the process CPU seconds at exit. The last line is the whole command's (VmHWM over the run, CPU seconds).
Linux only (clear_refs "5" resets VmHWM).
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

FIELDS = {"VmRSS": "rss", "VmHWM": "hwm", "RssAnon": "anon", "RssFile": "file"}


def status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in FIELDS:
                out[FIELDS[key]] = int(line.split()[1]) * 1024
    return out


def reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class Phases:
    """Nested peak tracking: each open call's peak is the max of the VmHWM readings taken while it was open."""

    def __init__(self, path: Path):
        self.path, self.stack, self.peak = path, [], 0
        path.write_text("")

    def _fold(self) -> int:
        h = status()["hwm"]
        self.peak = max(self.peak, h)
        for frame in self.stack:
            frame["peak"] = max(frame["peak"], h)
        return h

    def _enter(self, label: str) -> dict[str, Any]:
        self._fold()
        s = status()
        frame = {"at": label, "peak": s["rss"], "rss_in": s["rss"]}
        self.stack.append(frame)
        reset_hwm()
        return frame

    def _exit(self, frame: dict[str, Any]) -> None:
        self._fold()
        self.stack.remove(frame)
        s = status()
        rec = {**frame, "rss_out": s["rss"], "anon_out": s["anon"], "file_out": s["file"]}
        rec["cpu_s"] = round(time.process_time(), 1)
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")

    def wrap(self, owner: Any, name: str, label: str) -> None:
        """Replace ``owner.name`` by a spanned call (a generator's whole iteration is one span, the consumer's work
        between its items included)."""
        fn = getattr(owner, name)

        if inspect.isgeneratorfunction(fn):

            @functools.wraps(fn)
            def gen(*args: Any, **kwargs: Any) -> Any:
                frame = self._enter(label)
                try:
                    yield from fn(*args, **kwargs)
                finally:
                    self._exit(frame)

            setattr(owner, name, gen)
            return

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            frame = self._enter(label)
            try:
                return fn(*args, **kwargs)
            finally:
                self._exit(frame)

        setattr(owner, name, call)

    def close(self, **extra: Any) -> None:
        self._fold()
        with self.path.open("a") as f:
            f.write(json.dumps({"at": "whole command", "peak": self.peak, "cpu_s": round(time.process_time(), 1),
                                **extra}) + "\n")  # fmt: skip


def main() -> None:
    model, out, rest = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    os.environ.setdefault("MOECOMPRESS_QUIET", "1")
    from moecompress.atomic import gradstream, heapr, run
    from moecompress.cli.main import app
    from moecompress.core.engine import Engine
    from moecompress.core.stream import LayerStream

    ph = Phases(out)
    ph.wrap(run, "job_profile", "profile pass")
    ph.wrap(run, "streamed_scores", "gradient pass + scores")
    ph.wrap(Engine, "layers", "engine forward (layers)")
    ph.wrap(gradstream, "_head_grads", "head gradients")
    ph.wrap(gradstream, "_backward_layer", "layer backward")
    ph.wrap(gradstream, "routed_counts", "rows kept (counts)")
    ph.wrap(run, "heapr_scores", "HEAPr scores")
    ph.wrap(heapr, "_quad_full", "one expert's w^T G w")
    chunked = gradstream.chunked_g

    def chunked_g(*args: Any, **kwargs: Any) -> Any:  # each chunk's G build is a span
        G = chunked(*args, **kwargs)
        holder = type("B", (), {"build": staticmethod(G.build)})
        ph.wrap(holder, "build", "one chunk's G built")
        return heapr.ChunkedG(G.num_experts, G.chunk, holder.build)

    gradstream.chunked_g = chunked_g
    ph.wrap(LayerStream, "load_layer", "load layer")
    ph.wrap(run, "write_atomic", "writing pass")
    code = 0
    try:
        app(["prune", model, "--granularity", "atom", *rest], standalone_mode=False)
    except SystemExit as e:
        code = int(e.code or 0)
    ph.close(code=code)


if __name__ == "__main__":
    main()
