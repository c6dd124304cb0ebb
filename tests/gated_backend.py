"""A backend whose start a test holds mid-way, and that counts its starts.

    python gated_backend.py DIR --addr HOST:PORT [echo flags]

Writes DIR/spawn-<pid> at once (one file per start, whichever host ran it), then
waits until DIR/open exists, then becomes the echo backend (same pid). Until then
it is not listening, so the daemon's load of it stays in progress.
"""

import os
import sys
import time
from pathlib import Path

# The gate is polled by this subprocess only; the test itself waits on conditions.
GATE_POLL_S = 0.02


def main() -> None:
    folder = Path(sys.argv[1])
    (folder / f"spawn-{os.getpid()}").write_text("")
    while not (folder / "open").exists():
        time.sleep(GATE_POLL_S)
    argv = [sys.executable, "-m", "modeld.backends.echo", *sys.argv[2:]]
    os.execv(sys.executable, argv)


if __name__ == "__main__":
    main()
