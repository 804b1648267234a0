"""The report renders in a real browser: headless Chromium screenshot, checked to be non-blank and colourful."""

from __future__ import annotations

import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from test_report import make_runs

from moecompress.report import build_report

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser")) if p), None)


def decode_png(data: bytes) -> np.ndarray:
    """Decode an 8-bit RGB/RGBA, non-interlaced PNG to [H, W, C] uint8 (enough for Chromium screenshots)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    w, h, depth, color, _, _, interlace = header
    assert depth == 8 and color in (2, 6) and interlace == 0, header
    c = 3 if color == 2 else 4
    raw = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(h, 1 + w * c)
    out = np.zeros((h, w * c), dtype=np.uint8)
    prev = np.zeros(w * c, dtype=np.int32)
    for y in range(h):
        f, line = raw[y, 0], raw[y, 1:].astype(np.int32)
        if f == 0:
            cur = line
        elif f == 1:  # Sub: running sum per channel
            cur = np.cumsum(line.reshape(w, c), axis=0).reshape(-1) % 256
        elif f == 2:  # Up
            cur = (line + prev) % 256
        else:  # Average / Paeth depend on the reconstructed left pixel: loop over pixels
            cur = np.zeros_like(line)
            for x in range(w):
                s = slice(x * c, x * c + c)
                a = cur[x * c - c : x * c] if x else np.zeros(c, dtype=np.int32)
                b = prev[s]
                if f == 3:
                    cur[s] = (line[s] + (a + b) // 2) % 256
                else:
                    cc = prev[x * c - c : x * c] if x else np.zeros(c, dtype=np.int32)
                    p = a + b - cc
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - cc)
                    pred = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, cc))
                    cur[s] = (line[s] + pred) % 256
        out[y] = cur
        prev = cur
    return out.reshape(h, w, c)


def test_decode_png_filters():
    """The decoder agrees with a hand-made PNG using each filter type."""
    img = np.random.default_rng(0).integers(0, 256, (5, 4, 3), dtype=np.uint8)
    rows = []
    for y in range(5):
        f = y  # filter types 0..4, one per row
        line = img[y].astype(np.int32).reshape(-1)
        up = img[y - 1].astype(np.int32).reshape(-1) if y else np.zeros(12, dtype=np.int32)
        left = np.concatenate([np.zeros(3, dtype=np.int32), line[:-3]])
        ul = np.concatenate([np.zeros(3, dtype=np.int32), up[:-3]])
        if f == 0:
            enc = line
        elif f == 1:
            enc = line - left
        elif f == 2:
            enc = line - up
        elif f == 3:
            enc = line - (left + up) // 2
        else:
            p = left + up - ul
            pa, pb, pc = abs(p - left), abs(p - up), abs(p - ul)
            enc = line - np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, ul))
        rows.append(bytes([f]) + (enc % 256).astype(np.uint8).tobytes())

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 5, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b"")
    assert np.array_equal(decode_png(png), img)


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium)")
def test_report_screenshot_is_not_blank(tmp_path: Path):
    runs = make_runs(tmp_path)
    page = tmp_path / "report.html"
    page.write_text(build_report([runs["profile"], runs["prune"], runs["merge"], runs["quant"]]), encoding="utf-8")
    shot = tmp_path / "shot.png"
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1280,2200",
        "--force-device-scale-factor=0.5", f"--screenshot={shot}", page.as_uri(),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert shot.is_file(), proc.stderr[-2000:]
    img = decode_png(shot.read_bytes())[..., :3].astype(np.int32)
    assert img.shape[:2] == (1100, 640)
    non_white = (img.min(axis=-1) < 235).mean()
    assert non_white > 0.03, f"only {non_white:.1%} of the page is drawn"
    # Coloured pixels (bars, heatmap cells) and dark text both appear.
    saturation = img.max(axis=-1) - img.min(axis=-1)
    assert (saturation > 80).mean() > 0.005
    assert (img.max(axis=-1) < 80).mean() > 0.002
