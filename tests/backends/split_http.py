"""The demo HTTP backend in a child process, so that its server can die while the replica lives.

    python tests/backends/split_http.py --addr H:P [echo_http flags]

This process is what modeld started and watches; it runs `modeld.backends.echo_http`
with the same arguments as its child, prints `server pid N` on stdout (the replica's
log), and waits for SIGTERM, which it passes on. When the test kills the server with
SIGKILL, this process stays: the replica's port refuses connections, but no exit tells
modeld so, as with a server that crashed inside a wrapper or a container.
"""

import signal
import subprocess
import sys
import threading


def main() -> int:
    child = subprocess.Popen([sys.executable, "-m", "modeld.backends.echo_http", *sys.argv[1:]])
    print(f"server pid {child.pid}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    if child.poll() is None:
        child.terminate()
        child.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
