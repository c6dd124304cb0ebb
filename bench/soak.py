"""The chaos soak: the real daemon under client load while a fault injector breaks things.

    .venv/bin/python bench/soak.py --duration 120        # `make soak`
    .venv/bin/python bench/soak.py --duration 30 --json out.json

Starts `modeld serve` with demo-backend models that start slowly, crash on their
own, or ignore SIGTERM. For `--duration` seconds, client tasks Route -> Predict on
the backend -> Release (some never release, some Route with a deadline too tight
to meet, some cancel mid-Route) while a fault injector SIGKILLs backends,
SIGSTOPs one for longer than the probe timeout, changes max_loaded and unloads
models under load. Then it checks, and prints as figures:

- every Route got a lease or UNAVAILABLE / DEADLINE_EXCEEDED / RESOURCE_EXHAUSTED
  (CANCELLED only where the client cancelled); no RPC ever got INTERNAL/UNKNOWN;
- at every sample (4 a second) and at the end, each replica's in_flight equals its
  live lease count (`Replica.live_leases`, read by the daemon in the same loop
  turn), and after the lease TTL both are 0;
- every backend process the daemon started (found by an environment marker) is a
  READY replica or gone, and none is left after the daemon stops;
- the registry passes integrity_check and its live rows are the live replicas.

Exit status 0 when every check passes, 1 when one fails.
"""

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import grpc

from modeld._proto.backend import backend_pb2, backend_pb2_grpc
from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld._proto.modeld.v1 import modeld_pb2_grpc as pb_grpc
from soak_tally import Tally, figures, print_figures

MARKER_VAR = "CHAOS_MARKER"
LEASE_TTL_S = 3.0
# The router's probe gives up on a backend after 2 s; a stop must outlast that.
STOP_FOR_S = 3.5
ROUTE_OK_CODES = frozenset({"OK", "UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"})
TERMINAL = frozenset({pb.STOPPED, pb.FAILED})
MODELS = {
    # name: (backend flags, max_replicas)
    "fast": ((), 2),
    "slow": (("--start-delay", "0.6", "--load-delay", "0.4"), 1),
    "crashy": (("--crash-after", "6"), 1),
    "stubborn": (("--ignore-sigterm",), 1),
}


def config_text(addr: str, work: Path, marker: str) -> str:
    lines = [
        f'listen = ["{addr}"]',
        f'state_dir = "{work / "state"}"',
        f'models_dir = "{work / "models"}"',
        'log_level = "info"',
        'shutdown_grace = "5s"',
        "[watchdog]",
        'watchdog_interval = "200ms"',
        "max_loaded = 5",
        "[routing]",
        f'lease_ttl = "{LEASE_TTL_S}s"',
        'probe_ttl = "1s"',
    ]
    for name, (flags, replicas) in MODELS.items():
        argv = ", ".join(
            f'"{a}"' for a in ("{python}", "-m", "modeld.backends.echo", "--addr", "{addr}", *flags)
        )
        lines += [
            f"[backends.{name}]",
            f"command = [{argv}]",
            'stop_grace = "1s"',
            f'env = {{ {MARKER_VAR} = "{marker}" }}',
            f"[models.{name}]",
            f'backend = "{name}"',
            f"max_replicas = {replicas}",
        ]
    return "\n".join(lines) + "\n"


def marked_pids(marker: str) -> set[int]:
    """Live (not zombie) processes carrying the run's environment marker."""
    needle = f"{MARKER_VAR}={marker}".encode()
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state not in ("Z", "X"):
                    found.add(int(entry.name))
    return found


def code_of(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code().name
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELLED"
    return f"EXCEPTION:{type(exc).__name__}"


class Soak:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.marker = uuid.uuid4().hex
        self.tally = Tally()
        self.rng = random.Random(args.seed)
        self.stop = asyncio.Event()
        # Set by the event watcher on every replica event (lease expiries included).
        self.changed = asyncio.Event()
        self.proc: asyncio.subprocess.Process | None = None
        self.channel: grpc.aio.Channel | None = None
        self.addr = ""
        self.stopped_pid: int | None = None

    @property
    def stub(self) -> pb_grpc.ModelControlStub:
        assert self.channel is not None
        return pb_grpc.ModelControlStub(self.channel)  # type: ignore[no-untyped-call]

    # the daemon

    async def start_daemon(self) -> None:
        (self.work / "models").mkdir(parents=True, exist_ok=True)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.addr = f"127.0.0.1:{sock.getsockname()[1]}"
        config = self.work / "modeld.toml"
        config.write_text(config_text(self.addr, self.work, self.marker))
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODELD_")}
        with (self.work / "daemon.log").open("wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "modeld.cli.main", "serve", "--config", str(config),
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, env=env,
            )  # fmt: skip
        self.channel = grpc.aio.insecure_channel(self.addr)
        await self.stub.Ping(pb.PingRequest(), wait_for_ready=True, timeout=30)

    async def stop_daemon(self) -> int:
        assert self.proc is not None and self.channel is not None
        await self.channel.close(None)
        self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.proc.wait(), 30)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            return -9

    # clients

    async def client(self, number: int) -> None:
        backends: dict[str, backend_pb2_grpc.BackendStub] = {}
        channels: list[grpc.aio.Channel] = []
        async with grpc.aio.insecure_channel(self.addr) as channel:
            stub = pb_grpc.ModelControlStub(channel)  # type: ignore[no-untyped-call]
            while not self.stop.is_set():
                model = self.rng.choice(list(MODELS))
                kind = self.rng.choices(
                    ["normal", "leak", "tight", "cancel"], weights=[70, 10, 10, 10]
                )[0]
                if kind == "tight":
                    await self.route(stub, model, self.rng.uniform(0.005, 0.3))
                elif kind == "cancel":
                    await self.cancelled_route(stub, model)
                else:
                    lease = await self.route(stub, model, 10.0)
                    if lease is not None:
                        await self.use(stub, lease, kind == "leak", backends, channels)
        for backend_channel in channels:
            await backend_channel.close(None)

    async def route(
        self, stub: pb_grpc.ModelControlStub, model: str, limit_s: float
    ) -> pb.RouteResponse | None:
        started = time.perf_counter()
        try:
            lease = await stub.Route(pb.RouteRequest(model=model), timeout=limit_s)
        except grpc.aio.AioRpcError as exc:
            self.note_route(exc.code().name)
            if exc.code() is grpc.StatusCode.UNAVAILABLE and "unexpected" in (exc.details() or ""):
                self.tally.failures.append(f"Route hid a bug: {exc.details()}")
            return None
        elapsed = (time.perf_counter() - started) * 1000
        self.note_route("OK")
        self.tally.route_ms.append(elapsed)
        if not lease.cold_start:
            self.tally.warm_route_ms.append(elapsed)
        return lease

    def note_route(self, code: str, cancelled_by_us: bool = False) -> None:
        self.tally.routes[code] += 1
        self.tally.call("Route", code)
        if code not in ROUTE_OK_CODES and not (cancelled_by_us and code == "CANCELLED"):
            self.tally.failures.append(f"Route answered {code}")

    async def cancelled_route(self, stub: pb_grpc.ModelControlStub, model: str) -> None:
        call = stub.Route(pb.RouteRequest(model=model), timeout=10)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.shield(asyncio.ensure_future(self._settle(call))), self.rng.uniform(0, 0.01)
            )
        call.cancel()
        try:
            lease = await call
        except (grpc.aio.AioRpcError, asyncio.CancelledError) as exc:
            self.note_route(code_of(exc), cancelled_by_us=True)
            return
        self.note_route("OK")
        await stub.Release(pb.ReleaseRequest(lease_id=lease.lease_id), timeout=10)

    @staticmethod
    async def _settle(call: Any) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            await call

    async def use(
        self,
        stub: pb_grpc.ModelControlStub,
        lease: pb.RouteResponse,
        leak: bool,
        backends: dict[str, backend_pb2_grpc.BackendStub],
        channels: list[grpc.aio.Channel],
    ) -> None:
        if lease.address not in backends:
            channel = grpc.aio.insecure_channel(lease.address)
            channels.append(channel)
            backends[lease.address] = backend_pb2_grpc.BackendStub(channel)  # type: ignore[no-untyped-call]
        outcome = pb.OK
        try:
            await backends[lease.address].Predict(
                backend_pb2.PredictOptions(Prompt="soak"), timeout=1.0
            )
            self.tally.served += 1
        except grpc.aio.AioRpcError:
            self.tally.predict_failed += 1
            outcome = pb.BACKEND_UNREACHABLE
        if leak:
            return
        await self.call(
            "Release", stub.Release(pb.ReleaseRequest(lease_id=lease.lease_id, outcome=outcome))
        )

    async def call(self, method: str, awaitable: Any) -> Any:
        try:
            reply = await awaitable
        except grpc.aio.AioRpcError as exc:
            self.tally.call(method, exc.code().name)
            return None
        self.tally.call(method, "OK")
        return reply

    # faults

    async def injector(self) -> None:
        actions = {
            "sigkill": self.sigkill,
            "sigstop": self.sigstop,
            "max_loaded": self.max_loaded,
            "unload": self.unload,
        }
        while not self.stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), self.rng.uniform(0.4, 1.2))
            if self.stop.is_set():
                return
            name = self.rng.choice(list(actions))
            if await actions[name]():
                self.tally.faults[name] += 1

    async def ready_pids(self) -> list[int]:
        reply = await self.call("ListReplicas", self.stub.ListReplicas(pb.ListReplicasRequest()))
        return [r.pid for r in reply.replicas if r.state == pb.READY and r.pid] if reply else []

    async def sigkill(self) -> bool:
        pids = [p for p in await self.ready_pids() if p != self.stopped_pid]
        if not pids:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.rng.choice(pids), signal.SIGKILL)
        return True

    async def sigstop(self) -> bool:
        pids = await self.ready_pids()
        if self.stopped_pid is not None or not pids:
            return False
        self.stopped_pid = pid = self.rng.choice(pids)
        asyncio.get_running_loop().call_later(STOP_FOR_S, self.resume)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
        return True

    def resume(self) -> None:
        if self.stopped_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.stopped_pid, signal.SIGCONT)
            self.stopped_pid = None

    async def max_loaded(self) -> bool:
        value = self.rng.randint(2, 6)
        request = pb.UpdateSettingsRequest(settings=pb.Settings(max_loaded=value))
        return await self.call("UpdateSettings", self.stub.UpdateSettings(request)) is not None

    async def unload(self) -> bool:
        request = pb.UnloadRequest(
            model=self.rng.choice(list(MODELS)), force=self.rng.random() < 0.5
        )
        request.drain_timeout.FromMilliseconds(500)
        return await self.call("Unload", self.stub.Unload(request, timeout=30)) is not None

    # observers

    async def sampler(self) -> None:
        while not self.stop.is_set():
            self.tally.pids |= marked_pids(self.marker)
            reply = await self.call(
                "ListReplicas", self.stub.ListReplicas(pb.ListReplicasRequest())
            )
            if reply is not None:
                self.tally.check_leases(reply.replicas, "sample")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), 0.25)

    async def watcher(self) -> None:
        stream = self.stub.WatchEvents(pb.WatchEventsRequest())
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            async for event in stream:
                self.changed.set()
                if event.reason == "lease_expired":
                    self.tally.events["lease_expired"] += 1
                    continue
                self.tally.events[pb.ReplicaState.Name(event.to_state)] += 1
                if event.to_state == pb.FAILED and event.from_state == pb.READY:
                    self.tally.events["crashed"] += 1

    # the end: quiesce, then check

    async def until(self, check: Any, limit_s: float) -> bool:
        """Re-evaluate `check` (an async predicate) after each replica event, and at
        least every 250 ms (a registry write or a process exit sends none), until it
        holds or `limit_s` has passed."""
        deadline = time.monotonic() + limit_s
        while not await check():
            if time.monotonic() > deadline:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), 0.25)
            self.changed.clear()
        return True

    async def replicas(self) -> list[pb.Replica]:
        reply = await self.stub.ListReplicas(pb.ListReplicasRequest(), timeout=10)
        return list(reply.replicas)

    async def settled(self) -> bool:
        """Every lease is gone and no replica is between states."""
        steady = (pb.READY, pb.STOPPED, pb.FAILED)
        return all(r.in_flight == 0 and r.state in steady for r in await self.replicas())

    def registry_rows(self) -> dict[str, str]:
        db = sqlite3.connect(self.work / "state" / "modeld.db", timeout=10)
        try:
            integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
            if integrity != "ok":
                self.tally.failures.append(f"registry integrity_check: {integrity}")
            rows = db.execute(
                "SELECT id, state FROM replicas WHERE state NOT IN ('STOPPED', 'FAILED')"
            ).fetchall()
        finally:
            db.close()
        return {str(rid): str(state) for rid, state in rows}

    async def rows_agree(self) -> bool:
        live = {
            r.id: pb.ReplicaState.Name(r.state)
            for r in await self.replicas()
            if r.state not in TERMINAL
        }
        return self.registry_rows() == live

    async def check(self) -> None:
        failures = self.tally.failures
        if not await self.until(self.settled, LEASE_TTL_S + 20):
            failures.append(f"not settled (in_flight / states): {await self.replicas()}")
        replicas = await self.replicas()
        self.tally.check_leases(replicas, "end")
        ready = {r.pid for r in replicas if r.state == pb.READY}
        stray = marked_pids(self.marker) - ready
        if stray:
            failures.append(f"backend processes that are no READY replica: {sorted(stray)}")
        if not await self.until(self.rows_agree, 5):
            failures.append(f"registry rows {self.registry_rows()} != live replicas {replicas}")
        self.tally.ready_at_end = len(ready)

    async def check_after_stop(self, code: int) -> None:
        if code != 0:
            self.tally.failures.append(f"daemon exited with {code} on SIGTERM")

        async def none_left() -> bool:
            return not marked_pids(self.marker)

        if not await self.until(none_left, 10):
            left = sorted(marked_pids(self.marker))
            self.tally.failures.append(f"backends outlived the daemon: {left}")
        log = (self.work / "daemon.log").read_text(errors="replace")
        if "rpc_unexpected_error" in log:
            self.tally.failures.append("the daemon logged rpc_unexpected_error")

    async def run(self) -> None:
        await self.start_daemon()
        tasks = [asyncio.create_task(self.client(n)) for n in range(self.args.clients)]
        tasks += [asyncio.create_task(t) for t in (self.injector(), self.sampler())]
        watcher = asyncio.create_task(self.watcher())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), self.args.duration)
        self.stop.set()
        await asyncio.gather(*tasks)
        self.resume()
        await self.check()
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        await self.check_after_stop(await self.stop_daemon())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of load and faults")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (daemon.log)")
    return parser.parse_args(argv)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="modeld-soak-"))
    soak = Soak(args, work)
    try:
        await asyncio.wait_for(soak.run(), args.duration + 120)
    except TimeoutError:
        soak.tally.failures.append("the soak did not finish within its time limit")
    finally:
        if soak.proc is not None and soak.proc.returncode is None:
            soak.proc.kill()
            await soak.proc.wait()
    result = figures(soak.tally, args)
    result["work_dir"] = str(work)
    if not args.keep and result["passed"]:
        shutil.rmtree(work, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = asyncio.run(main_async(args))
    print_figures(result)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
