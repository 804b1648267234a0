"""Resident-memory probe for measuring where a pass's peak is (off unless ``MOECOMPRESS_RSS_PROBE`` names a file).

    probe("prune: search start")   # appends {"at", "cpu_s", "rss", "hwm", "anon", "file"} (bytes) as a JSON line

``rss`` / ``hwm`` are /proc/self/status VmRSS / VmHWM; ``anon`` / ``file`` split VmRSS into anonymous memory and
file-backed pages (safetensors memory maps). Costs one environment lookup when off.
"""

from __future__ import annotations

import json
import os
import time

ENV = "MOECOMPRESS_RSS_PROBE"
_FIELDS = {"VmRSS": "rss", "VmHWM": "hwm", "RssAnon": "anon", "RssFile": "file"}


def probe(at: str) -> None:
    """Record this process's resident memory at point ``at`` (when ``MOECOMPRESS_RSS_PROBE`` is set)."""
    path = os.environ.get(ENV)
    if not path:
        return
    rec: dict[str, object] = {"at": at, "cpu_s": round(time.process_time(), 2)}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in _FIELDS:
                    rec[_FIELDS[key]] = int(line.split()[1]) * 1024
    except OSError:
        return
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
