"""Sizes and durations written the way people write them in config files (``"20GiB"``, ``"5m"``)."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BeforeValidator, Field

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: str | int) -> int:
    """Parse ``"20GiB"``, ``"1.5 GB"``, ``"512"`` or an int into bytes; raise ValueError else."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size must not be negative: {value}")
        return value
    if not isinstance(value, str):
        raise ValueError(f"not a size: {value!r}")
    m = _SIZE_RE.match(value)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(
            f"not a size: {value!r} (write e.g. 512, '64MiB', '20GiB', '500GB')"
        )
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_size(n: float) -> str:
    """Human-readable binary size for messages and tables."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def plural(n: int, word: str) -> str:
    """``1 file``, ``2 files``: counts in messages read as sentences."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


ByteSize = Annotated[int, BeforeValidator(parse_size)]
"""A pydantic field type that accepts ints and size strings."""


_DURATION_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$")


def parse_duration(value: str | float | int) -> float:
    """Parse ``"30s"``, ``"5m"``, ``"1h"``, ``"7d"`` or a number of seconds."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"duration must not be negative: {value}")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"not a duration: {value!r}")
    m = _DURATION_RE.match(value.lower())
    if not m or m.group(2) not in _DURATION_UNITS:
        raise ValueError(f"not a duration: {value!r} (write e.g. 30, '30s', '5m', '1h', '7d')")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


Duration = Annotated[float, BeforeValidator(parse_duration)]
"""A pydantic field type: seconds, from a number or a string such as ``"5m"``."""

PositiveDuration = Annotated[Duration, Field(gt=0)]
"""A :data:`Duration` that must be more than zero: timeouts and poll intervals, where 0 would
mean never waiting or spinning."""
