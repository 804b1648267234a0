"""core/limits: sizes parse exactly, the process-wide --max-memory round-trips, machine sizes are sane."""

from __future__ import annotations

import pytest
import torch

from moecompress.core import limits


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("64GB", 64 * 10**9),
        ("512MiB", 512 * 2**20),
        ("1.5e9", 1_500_000_000),
        ("2 GiB", 2 * 2**30),
        ("100", 100),
        ("0.5tb", 5 * 10**11),
        ("3k", 3000),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert limits.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "-1GB", "12 apples", "1e400", "0", "nan", "1..2GB", "0.1"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        limits.parse_size(text)


def test_memory_limit_round_trip() -> None:
    assert limits.memory_limit() is None
    try:
        limits.set_memory_limit(123456)
        assert limits.memory_limit() == 123456
        with pytest.raises(ValueError):
            limits.set_memory_limit(0)
    finally:
        limits.set_memory_limit(None)
    assert limits.memory_limit() is None


def test_machine_sizes() -> None:
    host = limits.host_memory_bytes()
    assert 2**28 < host < 2**50
    assert 0 < limits.host_available_bytes() <= host
    assert limits.gpu_memory_bytes("cpu") == 0
    if not torch.cuda.is_available():
        assert limits.gpu_memory_bytes("cuda") == 0
    assert limits.format_size(1536 * 2**20) == "1.5 GiB"
