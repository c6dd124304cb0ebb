"""Secret files of the config (TLS keys, token files): read once, checked, never logged.

Below the API and the cluster alike: the gRPC port checks tokens, and a modeld
presents its cluster token when it calls another.
"""

import stat
from pathlib import Path

import structlog

from modeld.errors import ConfigError

log = structlog.get_logger(__name__)

MIN_TOKEN_LEN = 16


def read_secret(key: str, path: str | Path) -> bytes:
    try:
        data = Path(path).read_bytes()
        mode = Path(path).stat().st_mode
    except OSError as exc:
        raise ConfigError(f"{key} {path}: {exc.strerror}") from None
    if key in ("tls_key", "auth_token_file") and mode & stat.S_IROTH:
        log.warning("secret_file_world_readable", key=key, path=str(path))
    return data


def load_tokens(path: str | Path) -> tuple[bytes, ...]:
    """The tokens of `auth_token_file`: one a line; blank lines and `#` comments skipped."""
    lines = read_secret("auth_token_file", path).decode("utf-8", errors="replace").splitlines()
    tokens = [line.strip() for line in lines]
    tokens = [t for t in tokens if t and not t.startswith("#")]
    if not tokens:
        raise ConfigError(f"auth_token_file {path}: no tokens in it (one per line)")
    for number, token in enumerate(tokens, 1):
        if len(token) < MIN_TOKEN_LEN or not token.isascii() or not token.isprintable():
            raise ConfigError(
                f"auth_token_file {path}: token {number} must be at least {MIN_TOKEN_LEN} "
                "printable ASCII characters (e.g. `openssl rand -hex 32`)"
            )
    return tuple(t.encode() for t in tokens)
