"""Small HTML building blocks shared by the report sections (every string passes through ``esc``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from moecompress.report.sidecars import num
from moecompress.report.svg import esc, fmt_num

MAX_INLINE_LIST = 24
MAX_DEPTH = 3
MAX_TEXT = 10_000  # characters of one string shown in a cell


def clip(value: Any) -> str:
    """``str(value)``, cut to MAX_TEXT characters (a sidecar string may be megabytes long)."""
    text = str(value)
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + f"… ({len(text):,} characters)"


def num_cell(value: Any, key: str = "", digits: int = 4, tag: str = "td") -> str:
    """A table cell showing a number; ``data-key``/``data-value`` keep the exact value for machines and tests."""
    v = num(value)
    if v is None:
        shown = "–" if value is None else esc(value)
        return f'<{tag} data-key="{esc(key)}">{shown}</{tag}>'
    return f'<{tag} class="num" data-key="{esc(key)}" data-value="{esc(repr(v))}">{esc(fmt_num(v, digits))}</{tag}>'


def text_cell(value: Any, tag: str = "td") -> str:
    """A table cell showing any value as escaped text."""
    return f"<{tag}>{'–' if value is None else esc(clip(value))}</{tag}>"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    """An HTML table; ``rows`` hold ready-made ``<td>`` strings, ``header`` plain text."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(r) + "</tr>" for r in rows)
    return f'<table class="{esc(cls)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def kv_table(rows: Sequence[tuple[str, str]], cls: str = "kv") -> str:
    """Two-column label/value table; values are ready-made cell strings."""
    return (
        f'<table class="{esc(cls)}"><tbody>'
        + "".join(f"<tr><th>{esc(k)}</th>{v}</tr>" for k, v in rows)
        + ("</tbody></table>")
    )


def generic(value: Any, depth: int = 0) -> str:
    """Render any JSON value readably: scalars as text, short lists inline, dicts as nested tables, big
    structures folded in ``<details>`` as pretty JSON."""
    if isinstance(value, dict):
        if not value:
            return "<em>empty</em>"
        if depth >= MAX_DEPTH or len(value) > 64:
            return _folded(value)
        rows = "".join(f"<tr><th>{esc(clip(k))}</th><td>{generic(v, depth + 1)}</td></tr>" for k, v in value.items())
        return f'<table class="kv nested"><tbody>{rows}</tbody></table>'
    if isinstance(value, list):
        if not value:
            return "<em>none</em>"
        flat = all(not isinstance(x, (dict, list)) for x in value) or all(
            isinstance(x, list) and all(not isinstance(y, (dict, list)) for y in x) for x in value
        )
        if flat and len(value) <= MAX_INLINE_LIST:
            return esc(clip(", ".join(_short(x) for x in value)))
        if all(isinstance(x, dict) for x in value) and len(value) <= MAX_INLINE_LIST and depth < MAX_DEPTH:
            keys = list(dict.fromkeys(k for x in value for k in x))
            rows = [[f"<td>{generic(x.get(k), depth + 1)}</td>" for k in keys] for x in value]
            return table(keys, rows, "nested")
        return _folded(value)
    if isinstance(value, float):
        return esc(fmt_num(value, 6))
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10_000:
        return esc(f"{value:,}")
    if value is None:
        return "–"
    return esc(clip(value))


def _short(x: Any) -> str:
    if isinstance(x, list):
        return "[" + ", ".join(_short(y) for y in x) + "]"
    if isinstance(x, float):
        return fmt_num(x, 6)
    return str(x)


def _folded(value: Any) -> str:
    n = len(value)
    text = json.dumps(value, indent=1, ensure_ascii=False, default=str)
    if len(text) > 200_000:
        text = text[:200_000] + "\n… (cut: shown up to 200,000 characters)"
    return f"<details><summary>{n} entries (JSON)</summary><pre>{esc(text)}</pre></details>"


def section(anchor: str, title: str, body: str) -> str:
    """A titled report section with an anchor for the table of contents."""
    return f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>{body}</section>'


def note(text: str) -> str:
    """A muted explanatory paragraph (text is escaped)."""
    return f'<p class="note">{esc(text)}</p>'
