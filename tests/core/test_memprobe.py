"""core.memprobe: off without its environment variable; with it, one JSON line per call with this process's memory."""

import json

from moecompress.core import memprobe


def test_probe_off_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv(memprobe.ENV, raising=False)
    memprobe.probe("nothing")
    assert list(tmp_path.iterdir()) == []


def test_probe_records_resident_memory(tmp_path, monkeypatch):
    path = tmp_path / "probe.jsonl"
    monkeypatch.setenv(memprobe.ENV, str(path))
    memprobe.probe("first")
    big = bytearray(64 << 20)  # touched: 64 MiB more anonymous memory
    for i in range(0, len(big), 4096):
        big[i] = 1
    memprobe.probe("second")
    a, b = (json.loads(line) for line in path.read_text().splitlines())
    assert (a["at"], b["at"]) == ("first", "second")
    assert b["anon"] - a["anon"] >= 60 << 20
    assert b["hwm"] >= b["rss"] >= b["anon"] > 0 and b["file"] >= 0
    del big
