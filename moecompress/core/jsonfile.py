"""Small JSON files from untrusted folders (config.json, indexes, manifests, profiles), read with bounds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import UserError

MAX_CONFIG_BYTES = 16 * 1024**2


def read_json_file(path: Path, what: str, max_bytes: int = MAX_CONFIG_BYTES) -> Any:
    """Parse a small JSON file; any way it can be unreadable (too large, not UTF-8, not JSON, nested too deep)
    becomes one UserError naming the file."""
    try:
        if path.stat().st_size > max_bytes:
            raise ValueError(f"larger than {max_bytes // 1024**2} MiB")
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:
        reason = "nested too deeply" if isinstance(err, RecursionError) else str(err).splitlines()[0]
        raise UserError(f"{path} is not a valid {what} ({reason})") from None
