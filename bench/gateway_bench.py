"""Gateway overhead benchmark (part of `make bench`): a measurement, not a test.

One daemon serving the demo HTTP backend (`echo-http`, one replica) and one
`modeld gateway` in front of it; the same HTTP client (aiohttp, keep-alive) asks
the replica directly and through the gateway, in alternating slices (ABAB...) so
drift on the shared machine hits both alike:

- a short non-streaming chat completion, one client: latency p50/p99 each way; the
  gateway's added latency is the difference of the two;
- the same through a modeld client that Routes, asks the replica and Releases (what
  a client of modeld does without the gateway), for context;
- a streamed completion: time to the first chunk, each way;
- requests/s at `--concurrency` (16) closed-loop clients, each way, with the CPU time
  each process (this client, the gateway, the daemon, the replica) spent per request:
  on a machine with fewer free cores than processes, req/s is bound by their sum;
- a bare gRPC Ping to the daemon: one unary round trip, the floor under the Route
  that every request through the gateway makes before it can be forwarded.

Output: a table with the targets and bench/results/gateway_bench.json (`harness.bench_main`).
"""

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

import harness
from harness import BenchError, Pair, Series, Target, cpu_seconds, daemon_command, serving
from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld.client import AsyncClient

TOOL = "gateway_bench"
MODEL = "echo-http"
START_LIMIT_S = 30.0
CONFIG = """
[backends.echo-http]
command = ["{{python}}", "-m", "modeld.backends.echo_http", "--addr", "{{addr}}", "--slots", "64"]
protocol = "http"

[models.echo-http]
backend = "echo-http"
max_replicas = 1
"""
SHORT = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}).encode()
STREAM = json.dumps(
    {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "one two three"}]}
).encode()
HEADERS = {"Content-Type": "application/json"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = harness.arguments(__doc__, "gateway_bench.json", 8.0, "figure and path")
    parser.add_argument("--concurrency", type=int, default=16, help="clients for req/s (16)")
    parser.add_argument("--slices", type=int, default=4, help="alternations per figure (4)")
    return parser.parse_args(argv)


class Gateway:
    """`modeld gateway` in its own process, serving once /health answers."""

    def __init__(self, daemon_addr: str, log_path: Path) -> None:
        self.listen = f"127.0.0.1:{harness.free_port()}"
        self._daemon_addr = daemon_addr
        self._log_path = log_path
        self._proc: asyncio.subprocess.Process | None = None

    async def spawn(self) -> None:
        """Fork it before this process has gRPC channels (see harness.spawn_all)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODELD_")}
        argv = ["gateway", "--addr", self._daemon_addr, "--listen", self.listen]
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        with self._log_path.open("wb") as log:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "modeld.cli.main", *argv, "--log-level", "warning",
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, env=env,
            )  # fmt: skip

    async def wait_serving(self, session: aiohttp.ClientSession) -> None:
        if self._proc is None:
            raise BenchError("the gateway was not started")
        deadline = time.monotonic() + START_LIMIT_S
        while time.monotonic() < deadline:
            if self._proc.returncode is not None:
                raise BenchError(f"the gateway exited; see {self._log_path}")
            try:
                async with session.get(f"http://{self.listen}/health") as reply:
                    if reply.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            # Polling a port that is not open yet: nothing to wait on but time.
            await asyncio.sleep(0.1)
        raise BenchError(f"the gateway did not serve within {START_LIMIT_S:g}s")

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise BenchError("the gateway is not running")
        return self._proc.pid

    async def stop(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            self._proc.terminate()
            await self._proc.wait()


def post(session: aiohttp.ClientSession, url: str, body: bytes) -> Pair:
    async def pair() -> None:
        async with session.post(url, data=body, headers=HEADERS) as reply:
            await reply.read()
            if reply.status != 200:
                raise BenchError(f"{url} answered {reply.status}")

    return pair


def leased_post(session: aiohttp.ClientSession, client: AsyncClient) -> Pair:
    async def pair() -> None:
        async with client.lease(MODEL, renew=False) as lease:
            await post(session, f"http://{lease.address}/v1/chat/completions", SHORT)()

    return pair


async def first_chunk(session: aiohttp.ClientSession, url: str) -> float:
    started = time.perf_counter()
    async with session.post(url, data=STREAM, headers=HEADERS) as reply:
        if reply.status != 200:
            raise BenchError(f"{url} answered {reply.status}")
        await reply.content.readany()
        took = time.perf_counter() - started
        await reply.read()
    return took


class Meter:
    """CPU time per request of each process, over the slices of each series."""

    def __init__(self, pids: dict[str, int]) -> None:
        self._pids = pids
        self._spent: dict[str, dict[str, float]] = {}

    async def run(self, series: Series, pair: Pair, seconds: float) -> None:
        before = {name: cpu_seconds(pid) for name, pid in self._pids.items()}
        await series.run(pair, seconds)
        spent = self._spent.setdefault(series.kind, dict.fromkeys(self._pids, 0.0))
        for name, pid in self._pids.items():
            spent[name] += cpu_seconds(pid) - before[name]

    def per_request_us(self, series: Series) -> dict[str, float]:
        count = max(1, len(series.latencies))
        spent = self._spent.get(series.kind, {})
        return {name: round(cpu / count * 1e6, 1) for name, cpu in spent.items()}


async def alternate(
    series: dict[str, Series], pairs: dict[str, Pair], meter: Meter, args: Any
) -> None:
    for _ in range(args.slices):
        for name, pair in pairs.items():
            await meter.run(series[name], pair, args.seconds / args.slices)


def ping_pair(client: AsyncClient) -> Pair:
    async def pair() -> None:
        await client.stub.Ping(pb.PingRequest(), timeout=harness.CALL_LIMIT_S)

    return pair


async def measure(
    session: aiohttp.ClientSession,
    urls: dict[str, str],
    client: AsyncClient,
    meter: Meter,
    args: Any,
) -> dict[str, Any]:
    single = {
        name: post(session, f"{url}/v1/chat/completions", SHORT) for name, url in urls.items()
    }
    single["leased"] = leased_post(session, client)
    single["ping"] = ping_pair(client)
    for pair in single.values():
        await harness.warm_up(pair, 1, 0.5)
    one = {name: Series(name, 1) for name in single}
    await alternate(one, single, meter, args)
    ttfc: dict[str, list[float]] = {name: [] for name in urls}
    for _ in range(200):
        for name, url in urls.items():
            ttfc[name].append(await first_chunk(session, f"{url}/v1/chat/completions"))
    many = {f"{name}-c": Series(f"{name}-c", args.concurrency) for name in urls}
    await alternate(many, {f"{name}-c": single[name] for name in urls}, meter, args)
    concurrent = {}
    for name in urls:
        series = many[f"{name}-c"]
        concurrent[name] = {**series.summary(), "cpu_us_per_request": meter.per_request_us(series)}
    return {
        "single": {name: s.summary() for name, s in one.items()},
        "first_chunk": {name: harness.latency_summary(v) for name, v in ttfc.items()},
        "concurrent": concurrent,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp:
        work = Path(tmp)
        logs = args.out.parent
        command = daemon_command("daemon", CONFIG, work, logs / "gateway_bench_daemon.log")
        gateway = Gateway(command.addr, logs / "gateway_bench_gateway.log")
        await gateway.spawn()
        try:
            async with (
                serving([command]) as [daemon],
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session,
            ):
                await gateway.wait_serving(session)
                async with AsyncClient(daemon.addr) as client:
                    figures = await measure_through(session, daemon, gateway, client, args)
        finally:
            await gateway.stop()
    figures["added_p50_ms"] = round(
        figures["single"]["gateway"]["p50_ms"] - figures["single"]["direct"]["p50_ms"], 3
    )
    figures["added_p99_ms"] = round(
        figures["single"]["gateway"]["p99_ms"] - figures["single"]["direct"]["p99_ms"], 3
    )
    concurrent = figures["concurrent"]
    figures["rate_ratio"] = round(
        concurrent["gateway"]["pairs_per_s"] / max(concurrent["direct"]["pairs_per_s"], 1e-9), 3
    )
    figures["concurrency"] = args.concurrency
    return figures


async def measure_through(
    session: aiohttp.ClientSession,
    daemon: harness.Server,
    gateway: "Gateway",
    client: AsyncClient,
    args: Any,
) -> dict[str, Any]:
    async with client.lease(MODEL) as lease:
        address, replica_id = lease.address, lease.replica_id
    listed = await client.stub.ListReplicas(pb.ListReplicasRequest(model=MODEL))
    replica_pid = next(r.pid for r in listed.replicas if r.id == replica_id)
    pids = {"client": os.getpid(), "gateway": gateway.pid, "daemon": daemon.proc.pid}
    meter = Meter({**pids, "replica": replica_pid})
    urls = {"direct": f"http://{address}", "gateway": f"http://{gateway.listen}"}
    harness.progress(TOOL, f"replica {address}, gateway {gateway.listen}")
    return await measure(session, urls, client, meter, args)


def targets(results: dict[str, Any]) -> list[Target]:
    added, ratio = results.get("added_p50_ms"), results.get("rate_ratio")
    return [
        Target("added latency p50 (ms)", added, "<= 1", added is not None and added <= 1.0),
        Target(
            f"req/s at c={results.get('concurrency')}, gateway/direct",
            ratio,
            ">= 0.5",
            ratio is not None and ratio >= 0.5,
        ),
    ]


def render(results: dict[str, Any], checks: list[Target]) -> str:
    lines = ["gateway overhead (the same client, the replica directly vs through the gateway)"]
    lines.append(f"  {'figure':<44}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>9}")
    rows = [
        ("short request, direct", results["single"]["direct"]),
        ("short request, gateway", results["single"]["gateway"]),
        ("short request, Route+request+Release", results["single"]["leased"]),
        ("a bare gRPC Ping to the daemon (floor)", results["single"]["ping"]),
        ("first chunk of a stream, direct", results["first_chunk"]["direct"]),
        ("first chunk of a stream, gateway", results["first_chunk"]["gateway"]),
        (f"c={results['concurrency']}, direct", results["concurrent"]["direct"]),
        (f"c={results['concurrency']}, gateway", results["concurrent"]["gateway"]),
    ]
    for name, row in rows:
        rate = f"{row['pairs_per_s']:>9.0f}" if "pairs_per_s" in row else f"{'':>9}"
        lines.append(f"  {name:<44}{row['p50_ms']:>9.3f}{row['p99_ms']:>9.3f}{rate}")
    lines.append(
        f"  added by the gateway: p50 {results['added_p50_ms']:.3f} ms, "
        f"p99 {results['added_p99_ms']:.3f} ms; req/s ratio {results['rate_ratio']:.3f}"
    )
    for way in ("direct", "gateway"):
        cpu = results["concurrent"][way]["cpu_us_per_request"]
        spent = ", ".join(f"{name} {us:.0f}" for name, us in cpu.items())
        lines.append(f"  CPU µs per request at c={results['concurrency']}, {way}: {spent}")
    lines += harness.targets_table(checks, 44)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return harness.bench_main(TOOL, args.out, lambda: run(args), targets, render)


if __name__ == "__main__":
    sys.exit(main())
