"""What the benchmarks are built from: server processes, closed-loop load, figures.

A `Server` is a gRPC server in its own process (the daemon or the reference),
started with its output in a log file and awaited on `Ping` racing its exit;
`daemon_command` writes a daemon's config (`CONFIG_HEAD`, then the benchmark's
own, mostly on `ECHO_BACKEND`), `serving` runs servers for a block and `daemon_serving` one daemon
in a temporary directory; `load_ready` loads replicas that must come up READY.
A `Series` accumulates one workload's pairs over several timed slices, so that
workloads measured in alternating slices see the same drift. `quantile` and
`latency_summary` are the one percentile code; `section` records a failed figure
group so the others are still measured; `bench_main` is every benchmark's main.
"""

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import uvloop
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld._proto.modeld.v1 import modeld_pb2_grpc as pb_grpc

START_LIMIT_S = 30.0
STOP_LIMIT_S = 20.0
CALL_LIMIT_S = 30.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Retry a refused connection within milliseconds (not gRPC's 1 s), so that the time
# to serving is the daemon's, not the channel's backoff.
FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 5),
    ("grpc.min_reconnect_backoff_ms", 5),
    ("grpc.max_reconnect_backoff_ms", 10),
]

# Every benchmark daemon's config begins so (`daemon_command`); a benchmark's template
# follows it, its own top-level keys (if any) first, before its tables.
CONFIG_HEAD = """listen = ["{addr}"]
state_dir = "{state}"
models_dir = "{models}"
log_level = "warning"
shutdown_grace = "5s"
"""
# The demo backend most benchmark models run on; its own keys may follow it.
ECHO_BACKEND = """
[backends.echo]
command = ["{{python}}", "-m", "modeld.backends.echo", "--addr", "{{addr}}"]
"""

Pair = Callable[[], Awaitable[None]]
HERE = Path(__file__).resolve().parent
Results = dict[str, Any]


class BenchError(Exception):
    """A measurement could not be taken; the message says why."""


@dataclass(frozen=True)
class Target:
    name: str
    value: float | None
    goal: str
    ok: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def quantile(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank below) of `values`; 0 for none."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def latency_summary(seconds: list[float]) -> dict[str, float]:
    """p50, p99 and max in ms of call durations given in seconds."""
    return {
        "p50_ms": round(quantile(seconds, 0.50) * 1000, 3),
        "p99_ms": round(quantile(seconds, 0.99) * 1000, 3),
        "max_ms": round(max(seconds, default=0.0) * 1000, 3),
        "samples": len(seconds),
    }


def arguments(doc: str | None, out_name: str, seconds: float, per: str) -> argparse.ArgumentParser:
    """The flags every benchmark has: `--seconds` (per `per`) and `--out` (its JSON)."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument(
        "--seconds", type=float, default=seconds, help=f"per {per} (default {seconds:g})"
    )
    parser.add_argument("--out", type=Path, default=HERE / "results" / out_name)
    return parser


def progress(tool: str, text: str) -> None:
    print(f"{tool}: {text}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rpc_error(exc: grpc.aio.AioRpcError) -> str:
    return f"{exc.code().name}: {exc.details()}"


@dataclass
class Server:
    name: str
    addr: str
    proc: asyncio.subprocess.Process
    log_path: Path
    channel: grpc.aio.Channel = field(init=False)
    stub: pb_grpc.ModelControlStub = field(init=False)

    def __post_init__(self) -> None:
        self.channel = grpc.aio.insecure_channel(self.addr, options=FAST_RECONNECT)
        self.stub = pb_grpc.ModelControlStub(self.channel)  # type: ignore[no-untyped-call]

    async def wait_health_serving(self) -> None:
        """Until `grpc.health.v1` says SERVING (watched, not polled), or the process exits.

        The port is polled first: gRPC waits ~100 ms between connection attempts
        whatever the reconnect options say, so a channel that tried before the daemon
        listened would add up to that to the figure, none of it the daemon's.
        """
        await self._unless_exited(self._listening())
        health = health_pb2_grpc.HealthStub(self.channel)  # type: ignore[no-untyped-call]
        watch = health.Watch(health_pb2.HealthCheckRequest(), wait_for_ready=True)

        async def serving() -> None:
            async for reply in watch:
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return

        try:
            await self._unless_exited(serving())
        finally:
            watch.cancel()

    async def _listening(self) -> None:
        host, _, port = self.addr.rpartition(":")
        while True:
            try:
                _, writer = await asyncio.open_connection(host, int(port))
            except OSError:
                await asyncio.sleep(0.001)
                continue
            writer.close()
            return

    async def _unless_exited(self, work: Coroutine[Any, Any, None]) -> None:
        running = asyncio.ensure_future(work)
        exited = asyncio.ensure_future(self.proc.wait())
        try:
            async with asyncio.timeout(START_LIMIT_S):
                await asyncio.wait({running, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
            running.cancel()
        if not running.done() or running.cancelled():
            raise BenchError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}")
        running.result()

    async def wait_serving(self) -> None:
        ping = asyncio.ensure_future(
            self.stub.Ping(pb.PingRequest(), wait_for_ready=True, timeout=START_LIMIT_S)
        )
        exited = asyncio.ensure_future(self.proc.wait())
        done, _ = await asyncio.wait({ping, exited}, return_when=asyncio.FIRST_COMPLETED)
        exited.cancel()
        if ping not in done:
            ping.cancel()
            raise BenchError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}")
        try:
            ping.result()
        except grpc.aio.AioRpcError as exc:
            raise BenchError(
                f"{self.name} is not serving ({rpc_error(exc)}); see {self.log_path}"
            ) from None

    async def stop(self) -> None:
        await self.channel.close(None)
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), STOP_LIMIT_S)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


@dataclass(frozen=True)
class Command:
    name: str
    argv: list[str]
    addr: str
    log_path: Path


def daemon_command(name: str, template: str, work: Path, log_path: Path, **fields: Any) -> Command:
    """`modeld serve` on a free port; its config is `CONFIG_HEAD` then `template`,
    formatted with {addr}, {state} and {models} (created) under `work`, and `fields`."""
    addr = f"127.0.0.1:{free_port()}"
    models = work / "models"
    models.mkdir(parents=True, exist_ok=True)
    config = work / "modeld.toml"
    text = (CONFIG_HEAD + template).format(addr=addr, state=work / "state", models=models, **fields)
    config.write_text(text)
    argv = [sys.executable, "-m", "modeld.cli.main", "serve", "--config", str(config)]
    return Command(name, argv, addr, log_path)


async def spawn_all(commands: list[Command]) -> list[Server]:
    """Start each command with its output in its log; `Server.wait_serving` awaits one.

    Every process is forked before any channel exists: a fork while gRPC is busy
    makes gRPC skip its fork handlers (and say so on stderr).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELD_")}
    procs = []
    for command in commands:
        command.log_path.parent.mkdir(parents=True, exist_ok=True)
        with command.log_path.open("wb") as log:
            proc = await asyncio.create_subprocess_exec(
                *command.argv, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, env=env
            )
        procs.append(proc)
    return [
        Server(c.name, c.addr, proc, c.log_path) for c, proc in zip(commands, procs, strict=True)
    ]


@contextlib.asynccontextmanager
async def serving(commands: list[Command]) -> AsyncIterator[list[Server]]:
    """Every command serving for the block (all forked first, see `spawn_all`), then stopped."""
    servers = await spawn_all(commands)
    try:
        for server in servers:
            await server.wait_serving()
        yield servers
    finally:
        for server in reversed(servers):
            await server.stop()


@contextlib.asynccontextmanager
async def daemon_serving(
    tool: str, template: str, log_path: Path | None = None, **fields: Any
) -> AsyncIterator[Server]:
    """One daemon (`daemon_command`) in a temporary directory, serving for the block;
    its log is `log_path`, else in that directory (gone with it)."""
    with tempfile.TemporaryDirectory(prefix=f"modeld-{tool}-") as tmp:
        work = Path(tmp)
        progress(tool, "starting the daemon")
        log = work / "modeld.log" if log_path is None else log_path
        async with serving([daemon_command("modeld", template, work, log, **fields)]) as [daemon]:
            yield daemon


async def load_ready(
    stub: pb_grpc.ModelControlStub, model: str, replicas: int = 1, limit_s: float = CALL_LIMIT_S
) -> list[pb.Replica]:
    """Load `replicas` of `model`: the READY ones; fewer than that is a BenchError."""
    reply = await stub.Load(pb.LoadRequest(model=model, replicas=replicas), timeout=limit_s)
    ready = [r for r in reply.replicas if r.state == pb.READY]
    if len(ready) < replicas:
        raise BenchError(f"Load gave {len(ready)} READY replicas of {model}, wanted {replicas}")
    return ready


async def section(tool: str, name: str, work: Awaitable[Results]) -> Results:
    """One figure group; a failure is recorded (and said) so the others are still measured."""
    try:
        return await work
    except grpc.aio.AioRpcError as exc:
        error = rpc_error(exc)
    except (BenchError, TimeoutError) as exc:
        error = str(exc) or type(exc).__name__
    progress(tool, f"{name} failed: {error}")
    return {"error": error}


def targets_table(checks: list[Target], width: int | None = None) -> list[str]:
    """The targets' rows; the figure column is `width` wide, else fits the longest name."""
    if width is None:
        width = max((len(c.name) for c in checks), default=10) + 2
    lines = ["\nTargets", f"  {'figure':<{width}}{'value':>10}  {'target':<8}"]
    for t in checks:
        value = "ERROR" if t.value is None else f"{t.value:.3g}"
        lines.append(f"  {t.name:<{width}}{value:>10}  {t.goal:<8}{'ok' if t.ok else 'MISSED'}")
    return lines


def bench_main(
    tool: str,
    out: Path,
    run: Callable[[], Coroutine[Any, Any, Results]],
    targets: Callable[[Results], list[Target]],
    render: Callable[[Results, list[Target]], str],
) -> int:
    """Run on uvloop, judge, write the JSON to `out`, print the table; 0 unless a
    figure group could not be measured."""
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            results = runner.run(run())
    except BenchError as exc:
        print(f"{tool}: {exc}", file=sys.stderr)
        return 1
    checks = targets(results)
    results["targets"] = [c.to_dict() for c in checks]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(render(results, checks))
    print(f"\nJSON: {out}")
    return 1 if any(isinstance(v, dict) and "error" in v for v in results.values()) else 0


def route_pair(stub: pb_grpc.ModelControlStub, model: str) -> Pair:
    """Route then Release: what every client does around each inference request."""
    route = pb.RouteRequest(model=model)

    async def pair() -> None:
        lease = await stub.Route(route, timeout=CALL_LIMIT_S)
        reply = await stub.Release(pb.ReleaseRequest(lease_id=lease.lease_id), timeout=CALL_LIMIT_S)
        if not reply.released:
            raise BenchError(f"lease {lease.lease_id} was not released")

    return pair


def stream_pair(stub: pb_grpc.ModelControlStub, model: str) -> Pair:
    """Route then Release on a RouteStream: each worker has a stream of its own and
    waits for each answer before it sends the next message, like a unary client.

    (A shared stream through `AsyncClient(stream=True)` makes the same daemon work,
    but its futures and reader task cost this process more CPU per pair, which on
    2 cores is CPU the daemon does not get.)"""
    idle: list[Any] = []
    ids = itertools.count(1)
    route = pb.RouteRequest(model=model)

    async def ask(call: Any, **message: Any) -> Any:
        call_id = next(ids)
        await call.write(pb.RouteStreamRequest(id=call_id, **message))
        answer = await call.read()
        if answer is grpc.aio.EOF or answer.id != call_id:
            raise BenchError(f"RouteStream answered {answer!r} to call {call_id}")
        kind = answer.WhichOneof("result")
        if kind == "error":
            raise BenchError(f"RouteStream: {answer.error.code}: {answer.error.message}")
        return getattr(answer, kind)

    async def pair() -> None:
        call = idle.pop() if idle else stub.RouteStream()
        lease = await ask(call, route=route)
        reply = await ask(call, release=pb.ReleaseRequest(lease_id=lease.lease_id))
        idle.append(call)
        if not reply.released:
            raise BenchError(f"lease {lease.lease_id} was not released")

    return pair


def empty_pair(channel: grpc.aio.Channel) -> Pair:
    """Two `grpc.health.v1` Checks: the floor a Route+Release pair is compared with.

    The health servicer is grpc's own and runs none of modeld's per-call code (its
    request id, its canonical log line, its error mapping): the empty unary RPC of
    this stack, on the same daemon and the same channel as the pairs it is compared
    with. (Ping, which goes through all of that, would hide its cost in the baseline.)
    """
    check = health_pb2_grpc.HealthStub(channel)  # type: ignore[no-untyped-call]
    request = health_pb2.HealthCheckRequest()

    async def pair() -> None:
        await check.Check(request, timeout=CALL_LIMIT_S)
        await check.Check(request, timeout=CALL_LIMIT_S)

    return pair


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far (from /proc/<pid>/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may hold spaces; the fields after its ")" do not.
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_mib(pid: int) -> float:
    """Resident set size of process `pid` in MiB (VmRSS of /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"/proc/{pid}/status has no VmRSS")


@dataclass
class Series:
    """One workload at one concurrency, accumulated over timed slices."""

    kind: str
    concurrency: int
    # The daemon whose CPU time each slice is charged (None: not measured).
    pid: int | None = None
    seconds: float = 0.0
    cpu_s: float = 0.0
    latencies: list[float] = field(default_factory=list)

    async def run(self, pair: Pair, seconds: float) -> None:
        """`concurrency` tasks call `pair` back to back for `seconds`."""
        cpu_before = cpu_seconds(self.pid) if self.pid is not None else 0.0
        started = time.perf_counter()
        end = started + seconds
        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(self.concurrency):
                    group.create_task(self._worker(pair, end))
        except ExceptionGroup as failed:
            # The first failure is the story; the group cancelled the other workers.
            raise failed.exceptions[0] from None
        self.seconds += time.perf_counter() - started
        if self.pid is not None:
            self.cpu_s += cpu_seconds(self.pid) - cpu_before

    async def _worker(self, pair: Pair, end: float) -> None:
        while (started := time.perf_counter()) < end:
            await pair()
            self.latencies.append(time.perf_counter() - started)

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    @property
    def cpu_us_per_pair(self) -> float | None:
        """The daemon's CPU time per pair, in µs (None when not measured)."""
        if self.pid is None or not self.latencies:
            return None
        return self.cpu_s / len(self.latencies) * 1e6

    def summary(self) -> dict[str, Any]:
        latency = latency_summary(self.latencies)
        return {
            "kind": self.kind,
            "concurrency": self.concurrency,
            "pairs": len(self.latencies),
            "seconds": round(self.seconds, 3),
            "pairs_per_s": round(self.rate, 1),
            "daemon_cpu_us_per_pair": (
                None if (cpu := self.cpu_us_per_pair) is None else round(cpu, 1)
            ),
            "p50_ms": latency["p50_ms"],
            "p99_ms": latency["p99_ms"],
        }


async def warm_up(pair: Pair, concurrency: int, seconds: float) -> None:
    await Series("warm-up", concurrency).run(pair, seconds)


class EventWatch:
    """The replica state changes of one model, as `WatchEvents` streams them."""

    def __init__(self, stub: pb_grpc.ModelControlStub, model: str) -> None:
        self._reached: dict[int, set[str]] = defaultdict(set)
        self._changed = asyncio.Condition()
        self._call = stub.WatchEvents(pb.WatchEventsRequest(model=model))
        self._task = asyncio.create_task(self._follow())

    async def _follow(self) -> None:
        try:
            async for event in self._call:
                self._reached[event.to_state].add(event.replica_id)
                async with self._changed:
                    self._changed.notify_all()
        finally:
            async with self._changed:
                self._changed.notify_all()

    def reached(self, state: int) -> set[str]:
        """Ids of the replicas seen entering `state` so far."""
        return set(self._reached[state])

    async def wait(self, replica_ids: set[str], states: set[int]) -> None:
        """Until each replica was seen entering one of `states`, within CALL_LIMIT_S."""

        def seen() -> bool:
            return replica_ids <= set().union(*(self._reached[s] for s in states))

        async with asyncio.timeout(CALL_LIMIT_S), self._changed:
            await self._changed.wait_for(lambda: seen() or self._task.done())
        if not seen():
            raise BenchError(f"WatchEvents ended before {sorted(replica_ids)} reached {states}")

    async def close(self) -> None:
        self._call.cancel()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await self._task
