"""Units in config and on the command line.

Durations: seconds as a number, or "500ms", "30s", "5m", "1h". Sizes: bytes as a
number, or "512MiB", "8GiB", "8G" (powers of 1024 either way).
"""

import math
import re

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*")


def parse_duration(value: object) -> float:
    """Seconds from a number or a string with a unit; ValueError with a readable message."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _RE.fullmatch(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    else:
        raise ValueError(
            f'expected a duration like 30, "500ms", "30s", "5m" or "1h", got {value!r}'
        )
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"expected a non-negative duration, got {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    if seconds and seconds < 1:
        return f"{seconds * 1000:g}ms"
    for unit, size in (("h", 3600.0), ("m", 60.0)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(value: object) -> int:
    """Bytes from a number or a string like "512MiB" or "8G"; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size, got {value!r}")
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, str) and (m := _SIZE_RE.fullmatch(value)):
        return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])
    raise ValueError(f'expected a size in bytes or like "8GiB", got {value!r}')


def format_size(n: int) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n}B"
