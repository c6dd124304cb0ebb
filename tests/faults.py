"""Helpers for fault-injection tests: find a daemon's backends, read memory, check the db.

Backends are found by a marker in their environment (set through the backend's
`env` in the config), so a test sees every process a daemon started, even one
spawned a moment before the daemon was killed and never reported to a client.
"""

import contextlib
import os
import sqlite3
import uuid
from pathlib import Path

MARKER_VAR = "CHAOS_MARKER"


def new_marker() -> str:
    return uuid.uuid4().hex


def echo_backend_toml(name: str, marker: str, *flags: str, stop_grace: str = "1s") -> str:
    """A [backends.NAME] table running the demo backend with `flags`, tagged with `marker`."""
    argv = ", ".join(
        f'"{part}"'
        for part in ("{python}", "-m", "modeld.backends.echo", "--addr", "{addr}", *flags)
    )
    return (
        f'[backends.{name}]\ncommand = [{argv}]\nstop_grace = "{stop_grace}"\n'
        f'env = {{ {MARKER_VAR} = "{marker}" }}\n'
    )


def marked_pids(marker: str) -> list[int]:
    """Live (not zombie) processes whose environment carries `marker`."""
    needle = f"{MARKER_VAR}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if needle in (entry / "environ").read_bytes().split(b"\0") and not _zombie(entry):
                found.append(int(entry.name))
    return sorted(found)


def _zombie(entry: Path) -> bool:
    return (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")


def rss_kib(pid: int) -> int:
    """Resident memory of `pid` in KiB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def integrity(db_path: Path) -> str:
    """PRAGMA integrity_check of a registry, read beside a daemon that may have it open."""
    db = sqlite3.connect(db_path, timeout=10)
    try:
        return "; ".join(str(row[0]) for row in db.execute("PRAGMA integrity_check"))
    finally:
        db.close()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):
        return not _zombie(Path(f"/proc/{pid}"))
    return False
