"""A test backend over `protocol = "http"` whose /metrics says what the test wrote.

    python tests/backends/load_backend.py --host H --port P --dir DIR

`GET /health` is 200 at once. `GET /metrics` first appends a line to DIR/P.hits
(so a test can wait for scrapes to have happened), then answers with the text of
DIR/P.prom, or vLLM-style gauges at 0 while there is no such file. A file that
says exactly `HANG` makes it never answer (a wedged metrics endpoint).
"""

import argparse
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

IDLE = "vllm:num_requests_waiting 0\nvllm:num_requests_running 0\n"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dir", required=True)
    args = parser.parse_args()
    report, hits = Path(args.dir) / f"{args.port}.prom", Path(args.dir) / f"{args.port}.hits"
    never = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/health":
                self._reply(200, '{"status": "ok"}')
            elif self.path == "/metrics":
                with hits.open("a") as f:
                    f.write("hit\n")
                text = report.read_text() if report.exists() else IDLE
                if text == "HANG":
                    never.wait()
                self._reply(200, text)
            else:
                self._reply(404, '{"error": "not found"}')

        def _reply(self, code: int, text: str) -> None:
            data = text.encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            return

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    print(f"load_backend listening on {args.host}:{args.port}", file=sys.stderr, flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
