"""N `StreamLogs follow` clients in a process of their own that never read.

Run by flood_bench.py: `stalled_followers.py ADDR MODEL N`. Each stream reads its
first line (so it is known to be following), then stops reading; "ready" on stdout
says all N do. Exits when stdin closes. Dashboards are other processes on other
connections, so their cost is not charged to the clients the benchmark times.
"""

import asyncio
import sys

import grpc
import uvloop

from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld._proto.modeld.v1 import modeld_pb2_grpc as pb_grpc


async def main(addr: str, model: str, n: int) -> None:
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = pb_grpc.ModelControlStub(channel)  # type: ignore[no-untyped-call]
        request = pb.StreamLogsRequest(model=model, follow=True)
        calls = [stub.StreamLogs(request) for _ in range(n)]
        for call in calls:
            await call.read()
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        for call in calls:
            call.cancel()


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
