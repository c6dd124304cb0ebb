"""The value parsers of the config schema (`config/__init__.py`, `models.py`, `gateway.py`).

Each parser takes what TOML, an environment variable or a flag gave and returns the
typed value, or raises ValueError saying what was expected; `parse_table` turns
that into a ConfigError naming the key.
"""

from collections.abc import Callable, Mapping
from typing import Any

from modeld.errors import ConfigError, InvalidArgument
from modeld.spec import check_name

Parser = Callable[[Any], Any]


def text(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"expected a string, got {v!r}")
    return v


def integer(v: Any) -> int:
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        return int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"expected an integer, got {v!r}")
    return v


def number(v: Any) -> float:
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            pass
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ValueError(f"expected a number, got {v!r}")
    return float(v)


def boolean(v: Any) -> bool:
    if isinstance(v, str) and v.lower() in ("true", "1", "yes", "false", "0", "no"):
        return v.lower() in ("true", "1", "yes")
    if not isinstance(v, bool):
        raise ValueError(f"expected true or false, got {v!r}")
    return v


def str_list(v: Any) -> tuple[str, ...]:
    if isinstance(v, str):
        v = [part.strip() for part in v.split(",") if part.strip()]
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ValueError(f"expected a list of strings, got {v!r}")
    return tuple(v)


def int_list(v: Any) -> tuple[int, ...]:
    if not isinstance(v, list):
        raise ValueError(f"expected a list of integers, got {v!r}")
    return tuple(integer(x) for x in v)


def str_map(v: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(v, dict):
        raise ValueError(f"expected a table, got {v!r}")
    out = []
    for key, value in v.items():
        if isinstance(value, dict | list):
            raise ValueError(f"{key}: expected a string, number or boolean, got {value!r}")
        out.append((str(key), str(value).lower() if isinstance(value, bool) else str(value)))
    return tuple(sorted(out))


def file_mode(v: Any) -> int:
    if isinstance(v, str):
        try:
            v = int(v, 8)
        except ValueError:
            raise ValueError(f'expected an octal mode like "0660", got {v!r}') from None
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 0o777:
        raise ValueError(f"expected a file mode 0..0777, got {v!r}")
    return v


def port_range(v: Any) -> tuple[int, int]:
    """ "FIRST-LAST" (or [FIRST, LAST]): unprivileged ports, FIRST <= LAST."""
    parts = v.split("-") if isinstance(v, str) else v
    if not isinstance(parts, list) or len(parts) != 2:
        raise ValueError(f'expected a port range like "20000-29999", got {v!r}')
    first, last = (integer(p.strip() if isinstance(p, str) else p) for p in parts)
    if not 1024 <= first <= last <= 65535:
        raise ValueError(f"expected FIRST-LAST with 1024 <= FIRST <= LAST <= 65535, got {v!r}")
    return first, last


def choice(*options: str) -> Parser:
    def parse(v: Any) -> str:
        if not isinstance(v, str) or v.lower() not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {v!r}")
        return v.lower()

    return parse


def parse_table(where: str, data: Any, schema: Mapping[str, Parser]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(f"config: {where}: expected a table")
    out = {}
    for key, value in data.items():
        name = f"{where}.{key}" if where else key
        if key not in schema:
            raise ConfigError(f"config: unknown key {name!r}")
        try:
            out[key] = schema[key](value)
        except ValueError as exc:
            raise ConfigError(f"config: {name}: {exc}") from None
    return out


def check_config_name(where: str, kind: str, name: str) -> None:
    try:
        check_name(kind, name)
    except InvalidArgument as exc:
        raise ConfigError(f"config: {where}: {exc}") from None
