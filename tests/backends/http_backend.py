"""A test backend over `protocol = "http"` that loads the way llama-server does.

    python tests/backends/http_backend.py --host H --port P --model FILE --ready-file PATH
        [--health-path /health] [--not-ready-status 503] [--quiet] [--ready-after S]
        [--control-dir DIR] [--head N] [--chatty-stdout N]

It listens at once, answers `GET <health path>` with 503 ("Loading model", or
--not-ready-status) until PATH exists (or, with --ready-after, until S seconds
after it started: loading on its own clock), then with 200; any other path is
404. The test creates PATH when it wants loading to end, so no timing is
involved. It exits with 1 when FILE does not exist, as a server that cannot
open its model does. Every request is printed on stdout ("GET /health 503",
an access line) unless --quiet.

Made to misbehave the way real servers do under load:
- --control-dir DIR: while DIR/hang-<port> exists, a health request is held
  (as llama_cpp.server holds /v1/models behind its busy model lock) until the
  file is removed; its access line is printed when it arrives. Once
  DIR/refuse-<port> exists it stops listening (connections are refused) but
  keeps running, as a server whose listener died does.
- --head N: prints N numbered "loader line i" lines on stderr before it listens.
- --chatty-stdout N: then prints N "chatter line i" lines on stdout.
"""

import argparse
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HOLD_POLL_S = 0.02


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--ready-file", required=True)
    parser.add_argument("--health-path", default="/health")
    parser.add_argument("--not-ready-status", type=int, default=503)
    parser.add_argument("--ready-after", type=float, default=None)
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--control-dir", default="")
    parser.add_argument("--head", type=int, default=0)
    parser.add_argument("--chatty-stdout", type=int, default=0)
    args = parser.parse_args()
    for i in range(args.head):
        print(f"loader line {i}", file=sys.stderr)
    if not Path(args.model).is_file():
        print(f"error: cannot open model {args.model}", file=sys.stderr, flush=True)
        return 1
    ready = Path(args.ready_file)
    began = time.monotonic()
    hang = Path(args.control_dir) / f"hang-{args.port}" if args.control_dir else None

    def loaded() -> bool:
        if args.ready_after is not None:
            return time.monotonic() - began >= args.ready_after
        return ready.exists()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != args.health_path:
                self._reply(404, {"error": "not found"})
                return
            if not args.quiet:
                print(f"GET {self.path}", flush=True)
            while hang is not None and hang.exists():
                time.sleep(HOLD_POLL_S)
            if loaded():
                self._reply(200, {"status": "ok"})
            else:
                message = {"code": args.not_ready_status, "message": "Loading model"}
                self._reply(args.not_ready_status, {"error": message})

        def _reply(self, code: int, body: dict[str, object]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            if not args.quiet:
                print(f"GET {self.path} {code}", flush=True)

        def log_message(self, format: str, *args: object) -> None:
            return

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    print(f"http_backend listening on {args.host}:{args.port}", file=sys.stderr, flush=True)
    for i in range(args.chatty_stdout):
        print(f"chatter line {i}")
    sys.stdout.flush()
    if args.control_dir:
        refuse = Path(args.control_dir) / f"refuse-{args.port}"
        threading.Thread(target=close_when, args=(refuse, server), daemon=True).start()
    server.serve_forever()
    server.server_close()
    threading.Event().wait()
    return 0


def close_when(path: Path, server: ThreadingHTTPServer) -> None:
    while not path.exists():
        time.sleep(HOLD_POLL_S)
    server.shutdown()


if __name__ == "__main__":
    sys.exit(main())
