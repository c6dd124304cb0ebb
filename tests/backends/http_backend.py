"""A test backend over `protocol = "http"` that loads the way llama-server does.

    python tests/backends/http_backend.py --host H --port P --model FILE --ready-file PATH

It listens at once, answers `GET /health` with 503 ("Loading model") until
PATH exists, then with 200; the test creates PATH when it wants loading to end,
so no timing is involved. It exits with 1 when FILE does not exist, as a server
that cannot open its model does. Every request is printed on stdout
("GET /health 503"), which the daemon counts as progress.
"""

import argparse
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--ready-file", required=True)
    args = parser.parse_args()
    if not Path(args.model).is_file():
        print(f"error: cannot open model {args.model}", file=sys.stderr, flush=True)
        return 1
    ready = Path(args.ready_file)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/health":
                self._reply(404, {"error": "not found"})
            elif ready.exists():
                self._reply(200, {"status": "ok"})
            else:
                self._reply(503, {"error": {"code": 503, "message": "Loading model"}})

        def _reply(self, code: int, body: dict[str, object]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            print(f"GET {self.path} {code}", flush=True)

        def log_message(self, format: str, *args: object) -> None:
            return

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    print(f"http_backend listening on {args.host}:{args.port}", file=sys.stderr, flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
