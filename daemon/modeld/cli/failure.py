"""How a failed client verb is reported: one line for people, one JSON document with --json.

A failed call prints `modeld: CODE: message` to stderr and exits 1; a bad flag or
configuration prints `modeld: message` and exits 2. With `--json` both print
`{"error": {"code": CODE, "message": message}}` to stdout instead (a bad flag's
code is INVALID_ARGUMENT), so a script reading stdout always gets JSON.
"""

import json
import sys
from dataclasses import dataclass

import grpc

EXIT_RPC_FAILED = 1
EXIT_USAGE = 2


@dataclass(frozen=True)
class Failure:
    code: str
    message: str
    exit_code: int

    def report(self, as_json: bool) -> int:
        """Print the failure as asked; returns the exit status."""
        if as_json:
            body = {"error": {"code": self.code, "message": self.message}}
            print(json.dumps(body, indent=2), flush=True)
        elif self.exit_code == EXIT_USAGE:
            print(f"modeld: {self.message}", file=sys.stderr, flush=True)
        else:
            print(f"modeld: {self.code}: {self.message}", file=sys.stderr, flush=True)
        return self.exit_code


def usage(message: str) -> Failure:
    return Failure("INVALID_ARGUMENT", message, EXIT_USAGE)


def of_rpc(exc: grpc.RpcError, addr: str) -> Failure:
    """A failed call, in the Python client's words (which say what to do when no
    modeld answers at `addr`)."""
    # Imported here: `modeld serve` reports failures through this module too, and the
    # Python client is start-up time the daemon does not need.
    from modeld.client.errors import from_rpc

    error = from_rpc(exc, addr)
    return Failure(error.status.name, error.message, EXIT_RPC_FAILED)
