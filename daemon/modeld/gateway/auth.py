"""Bearer keys for the gateway (`[gateway] api_keys_file`), compared in constant time.

The keys file holds one key a line (blank lines and `#` comments skipped). A request
must send `Authorization: Bearer <key>`. Both sides are hashed before the comparison,
so neither a key's content nor its length shows in how long a refusal takes, and every
key is compared, so neither does which one matched. Keys are never logged.
"""

import hashlib
import hmac
from pathlib import Path

from modeld.errors import ConfigError

_PREFIX = "bearer "


def read_keys(path: str) -> tuple[bytes, ...]:
    """The hashed keys of a keys file; a file that cannot be read or holds none is an error."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise ConfigError(f"gateway.api_keys_file {path}: {exc.strerror}") from None
    keys = [line.strip() for line in text.splitlines()]
    hashed = tuple(_digest(k) for k in keys if k and not k.startswith("#"))
    if not hashed:
        raise ConfigError(f"gateway.api_keys_file {path}: no key in it")
    return hashed


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class Keys:
    """The keys a request may present; with none configured, every request may pass."""

    def __init__(self, hashed: tuple[bytes, ...] = ()) -> None:
        self._hashed = hashed

    @property
    def required(self) -> bool:
        return bool(self._hashed)

    def allows(self, authorization: str | None) -> bool:
        if not self._hashed:
            return True
        given = authorization or ""
        if given[: len(_PREFIX)].lower() != _PREFIX:
            return False
        presented = _digest(given[len(_PREFIX) :].strip())
        match = False
        for key in self._hashed:
            match |= hmac.compare_digest(presented, key)
        return match
