"""A test backend that reports the ModelOptions it received, as LocalAI's backends do.

`python tests/backends/options_backend.py --addr HOST:PORT` serves the echo backend,
but every LoadModel first prints two lines on stdout:

    Parsed options: {"key": "value", ...}    # Options split on the first ':', as LocalAI's
    ModelOptions: {...}                       # every field that is set, as JSON

so a test can check, through the daemon's log stream, what reached the backend.
The option `crash_after_load:SECONDS` makes it exit with code 3 that long after a
successful load: a backend that crash-loops right after READY.
"""

import asyncio
import json
import os
import sys

import grpc
from google.protobuf.json_format import MessageToDict

from modeld._proto.backend import backend_pb2 as pb
from modeld._proto.backend import backend_pb2_grpc as pb_grpc
from modeld.backends import echo


def parse_options(entries: list[str]) -> dict[str, str]:
    """LocalAI's parsing: split on the first ':'; an entry without one is skipped."""
    parsed = {}
    for entry in entries:
        key, sep, value = entry.partition(":")
        if sep:
            parsed[key] = value
    return parsed


class OptionsBackend(echo.EchoBackend):
    async def LoadModel(
        self,
        request: pb.ModelOptions,
        context: grpc.aio.ServicerContext[pb.ModelOptions, pb.Result],
    ) -> pb.Result:
        options = parse_options(list(request.Options))
        print(f"Parsed options: {json.dumps(options)}", flush=True)
        fields = MessageToDict(request, preserving_proto_field_name=True)
        print(f"ModelOptions: {json.dumps(fields, sort_keys=True)}", flush=True)
        result = await super().LoadModel(request, context)
        if result.success and "crash_after_load" in options:
            asyncio.get_running_loop().call_later(float(options["crash_after_load"]), crash)
        return result


def crash() -> None:
    print("fatal: crashing after the load, on purpose", file=sys.stderr, flush=True)
    os._exit(3)


async def serve(flags: echo.Flags) -> int:
    stop = asyncio.Event()
    echo.install_signal_handlers(stop, ignore_sigterm=False)
    server = grpc.aio.server()
    pb_grpc.add_BackendServicer_to_server(OptionsBackend(flags), server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(flags.addr)
    await server.start()
    print(f"options_backend listening addr={flags.addr}", file=sys.stderr, flush=True)
    await stop.wait()
    await server.stop(echo.STOP_GRACE_S)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(serve(echo.parse_flags())))
