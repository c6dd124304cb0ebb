"""A backend that fails to bind the way a real server does, so a test can lose it a port.

    python tests/backends/bind_backend.py --host H --port P --say SERVER [--gate DIR]

With `--gate DIR` it first writes DIR/waiting-P and waits until DIR/go exists: the
test takes port P in between, after modeld chose it and before the backend binds,
which is the race modeld loses in the field. Then it binds H:P; when the port is
taken it prints what SERVER (grpc, uvicorn, llama-server, localai) prints then and
exits 1, as those servers do; else it becomes the echo backend on H:P (same pid).
"""

import argparse
import errno
import os
import socket
import sys
import time
from pathlib import Path

# The gate is polled by this subprocess only; the test itself waits on conditions.
GATE_POLL_S = 0.02
# Each server's own words when its port is taken (seen in the field; issue 21).
SAYS = {
    "grpc": (
        "RuntimeError: Failed to bind to address {host}:{port}; set GRPC_VERBOSITY=debug "
        "environment variable to see detailed error message."
    ),
    "uvicorn": (
        "ERROR:    [Errno 98] error while attempting to bind on address ('{host}', {port}): "
        "[errno 98] address already in use"
    ),
    "llama-server": "main: couldn't bind HTTP server socket, hostname: {host}, port: {port}",
    "localai": "listen tcp {host}:{port}: bind: address already in use",
}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--say", choices=sorted(SAYS), required=True)
    parser.add_argument("--gate", default="")
    args = parser.parse_args()
    if args.gate:
        gate = Path(args.gate)
        (gate / f"waiting-{args.port}").write_text(str(os.getpid()))
        while not (gate / "go").exists():
            time.sleep(GATE_POLL_S)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((args.host, args.port))
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        print(SAYS[args.say].format(host=args.host, port=args.port), file=sys.stderr, flush=True)
        return 1
    addr = f"{args.host}:{args.port}"
    os.execv(sys.executable, [sys.executable, "-m", "modeld.backends.echo", "--addr", addr])
    return 0


if __name__ == "__main__":
    sys.exit(main())
