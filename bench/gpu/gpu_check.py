"""GPU reality check (issue 16): the real daemon, real GPU backends, real NVML readings.

    python bench/gpu/gpu_check.py [--out DIR] [--alloc-fraction 0.35]

Starts `modeld serve` (own state dir, free port) with bench/gpu/gpu_backend.py as
its backend, and models gpu-a, gpu-b, gpu-c that each allocate the same amount of
device memory (a fraction of what is free at the start, so that two fit and a third
does not), then checks and prints five figures with pass/fail:

1. NVML free memory falls by about the allocation when a replica is READY, and the
   memory modeld shows for it (ListReplicas, as `modeld ps`) agrees within 5 %;
2. the backend sees exactly the GPU modeld placed it on (CUDA_VISIBLE_DEVICES in
   PCI bus order, one device, NVML's UUID);
3. with memory_threshold set, a third replica evicts the least recently used idle
   replica, never a busy one; with everything busy it is refused (deadline) and a
   model that can never fit is refused at once; lowering memory_threshold below
   the current use evicts the idle replica and not the busy one;
4. device memory returns to its baseline after Unload and after `kill -9` of
   modeld, and no replica is started into memory still held (each backend reports
   the free memory it found before allocating);
5. Route-to-lease time of a cold replica, split into spawn, interpreter start,
   imports (gRPC, torch), CUDA init and allocation (wall-clock marks from the backend).

The figures are printed, then a JSON summary (also written to DIR/gpu_check.json
with the daemon's log). Exit 0 when all five pass, 1 when one fails. Without an
NVIDIA GPU (no NVML, no device) it prints one line and exits 0, claiming nothing.
"""

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import figures as fig
import grpc
from fakegpu import FakeNvml, Mem
from grpc_health.v1 import health_pb2, health_pb2_grpc
from waits import pid_alive, until

from modeld._proto.modeld.v1 import modeld_pb2 as mpb
from modeld._proto.modeld.v1 import modeld_pb2_grpc

HERE = Path(__file__).resolve().parent
BACKEND = HERE / "gpu_backend.py"
MIB = fig.MIB
GIB = fig.GIB
# What a CUDA context takes, for the memory_estimate; measured per replica in figure 1.
CONTEXT_ESTIMATE = GIB
# A cold start takes seconds; a Route stuck on memory that never shows free fails sooner.
ROUTE_TIMEOUT_S = 45.0
BLOCKED_ROUTE_TIMEOUT_S = 4.0
SETTLE_S = 20.0


class NoGpu(Exception):
    """NVML is missing or reports no device: nothing can be checked here."""


class Nvml:
    def __init__(self) -> None:
        try:
            import pynvml
        except ImportError as exc:
            raise NoGpu(f"nvidia-ml-py is not installed ({exc})") from None
        try:
            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
        except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
            raise NoGpu(f"NVML is unavailable ({exc})") from None
        if count == 0:
            raise NoGpu("NVML reports no GPU")
        self._nvml = pynvml
        self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        self.uuids = [_text(pynvml.nvmlDeviceGetUUID(h)) for h in self._handles]
        self.names = [_text(pynvml.nvmlDeviceGetName(h)) for h in self._handles]
        self.pci = [_text(pynvml.nvmlDeviceGetPciInfo(h).busId) for h in self._handles]

    def mem(self, index: int = 0) -> Mem:
        info = self._nvml.nvmlDeviceGetMemoryInfo(self._handles[index])
        return Mem(int(info.free), int(info.used), int(info.total))

    def close(self) -> None:
        self._nvml.nvmlShutdown()


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Plan:
    """Sizes chosen from the free memory at the start."""

    alloc: int
    estimate: int
    threshold: float

    @classmethod
    def for_device(cls, base: Mem, fraction: float) -> "Plan":
        alloc = int(base.free * fraction) // GIB * GIB
        estimate = alloc + CONTEXT_ESTIMATE
        # Two replicas stay under the threshold; a third would cross it.
        two = base.used + 2 * estimate
        threshold = min(0.99, (two + alloc // 2) / base.total)
        return cls(alloc, estimate, round(threshold, 3))


def config_text(work: Path, port: int, plan: Plan, total: int, fake: FakeNvml | None) -> str:
    reports = work / "reports"
    extra_args, resources = fake.config() if fake is not None else ("", "")
    models = "".join(
        f'[models.{name}]\nbackend = "gpu"\ngpus = 1\n'
        f'memory_estimate = "{plan.estimate // MIB}MiB"\n'
        f'options = {{ alloc_mib = "{plan.alloc // MIB}" }}\n'
        for name in ("gpu-a", "gpu-b", "gpu-c")
    )
    huge = total + GIB
    return (
        f'listen = ["127.0.0.1:{port}"]\nstate_dir = "{work / "state"}"\n'
        f'models_dir = "{work / "models"}"\nlog_level = "info"\nlog_format = "json"\n'
        f'shutdown_grace = "5s"\n'
        f'[watchdog]\nmemory_threshold = {plan.threshold}\nwatchdog_interval = "200ms"\n'
        f"{resources}"
        f'[backends.gpu]\ncommand = ["{{python}}", "{BACKEND}", "--addr", "{{addr}}", '
        f'"--report-dir", "{reports}"{extra_args}]\nstop_grace = "5s"\nready_timeout = "90s"\n'
        f"{models}"
        f'[models.gpu-huge]\nbackend = "gpu"\ngpus = 1\nmemory_estimate = "{huge // MIB}MiB"\n'
    )


@dataclass
class Daemon:
    """One `modeld serve` process and a channel to it."""

    config: Path
    addr: str
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    channel: Any = None
    stub: Any = None

    async def start(self, limit_s: float = 30.0) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODELD_")}
        with self.log_path.open("ab") as log:
            # Popen returns once the child runs; its output goes to a file, not a pipe.
            self.proc = subprocess.Popen(  # noqa: ASYNC220
                [sys.executable, "-m", "modeld.cli.main", "serve", "--config", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
            )
        self.channel = grpc.aio.insecure_channel(self.addr)
        self.stub = modeld_pb2_grpc.ModelControlStub(self.channel)  # type: ignore[no-untyped-call]
        health = health_pb2_grpc.HealthStub(self.channel)
        await health.Check(health_pb2.HealthCheckRequest(), wait_for_ready=True, timeout=limit_s)

    def log(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    out.append(record)
        return out

    async def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(self.proc.wait)
        await self.channel.close()

    async def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.to_thread(self.proc.wait, 60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = await asyncio.to_thread(self.proc.wait)
        await self.channel.close()
        return code


@dataclass
class Run:
    """Everything one run of the check shares."""

    nvml: "Nvml | FakeNvml"
    base: Mem
    plan: Plan
    work: Path
    daemon: Daemon
    figures: list[fig.Figure] = field(default_factory=list)
    # Bytes one READY replica takes on the device (allocation + context), from figure 1.
    per_replica: int = 0
    pids: set[int] = field(default_factory=set)
    load_checks: list[fig.Step] = field(default_factory=list)

    # --- talking to modeld -------------------------------------------------

    async def route(self, model: str, deadline_s: float = ROUTE_TIMEOUT_S) -> Any:
        return await self.daemon.stub.Route(mpb.RouteRequest(model=model), timeout=deadline_s)

    async def release(self, lease: Any) -> None:
        await self.daemon.stub.Release(mpb.ReleaseRequest(lease_id=lease.lease_id), timeout=10)

    async def replicas(self) -> dict[str, Any]:
        """Live replicas by id."""
        reply = await self.daemon.stub.ListReplicas(mpb.ListReplicasRequest(), timeout=10)
        stopped = {mpb.STOPPED, mpb.FAILED}
        return {r.id: r for r in reply.replicas if r.state not in stopped}

    async def replica(self, replica_id: str) -> Any:
        return (await self.replicas()).get(replica_id)

    async def set_threshold(self, value: float) -> None:
        settings = mpb.Settings(memory_threshold=value)
        await self.daemon.stub.UpdateSettings(
            mpb.UpdateSettingsRequest(settings=settings), timeout=10
        )

    def evicted(self, replica_id: str) -> str | None:
        """The reason modeld logged for evicting `replica_id`, if it did."""
        for record in self.daemon.log():
            if record.get("event") == "replica_evicted" and record.get("replica_id") == replica_id:
                return str(record.get("reason"))
        return None

    # --- what backends report ----------------------------------------------

    async def report(self, pid: int) -> dict[str, Any]:
        path = self.work / "reports" / f"{pid}.json"
        found = await until(path.is_file, 10.0)
        if not found:
            raise RuntimeError(f"backend pid {pid} wrote no report to {path}")
        self.pids.add(pid)
        data: dict[str, Any] = json.loads(path.read_text())
        return data

    async def cold(self, model: str, when: str = "") -> tuple[Any, dict[str, Any]]:
        """Route `model` cold, and check its backend found free all but what the other
        live replicas hold (not before the size of a replica is known: `when` "")."""
        lease = await self.route(model)
        live = await self.replicas()
        replica = live.get(lease.replica_id)
        if replica is None:
            raise RuntimeError(f"replica {lease.replica_id} of {model} vanished after its Route")
        report = await self.report(replica.pid)
        if when:
            others = len(live) - 1
            self.load_checks.append(self.held_check(model, report, others, when))
        return lease, report

    def held_check(self, model: str, report: dict[str, Any], others: int, when: str) -> fig.Step:
        """A new replica must find the memory of stopped ones free (figure 4)."""
        own_context = max(self.per_replica - self.plan.alloc, 0)
        held = self.base.free - int(report["free_before"]) - own_context
        expected = others * self.per_replica
        ok = held <= expected + fig.BASELINE_SLACK
        seen = (
            f"others held {fig.fmt_bytes(held)} when it allocated "
            f"(expected {fig.fmt_bytes(expected)}: {others} live replica(s))"
        )
        what = f"{model} started into free memory ({when})"
        return fig.Step(what, ok, seen)

    async def settle(self, since: float | None = None, limit_s: float = SETTLE_S) -> float | None:
        """Seconds from `since` (monotonic; default now) until NVML shows the baseline
        again; None if it does not within `limit_s`."""
        started = time.monotonic() if since is None else since
        back = await until(
            lambda: fig.returned_to_baseline(self.base.used, self.nvml.mem().used), limit_s
        )
        return round(time.monotonic() - started, 3) if back else None


def failed_figures(done: list[fig.Figure], error: str, numbers: Iterable[int]) -> list[fig.Figure]:
    """A failing figure for each of `numbers` that a broken scenario left unmeasured."""
    have = {f.number for f in done}
    return [fig.Figure(n, "not measured", False, error) for n in numbers if n not in have]


async def run_scenario(
    run: Run,
    scenario: Callable[[Run], Awaitable[None]],
    numbers: Iterable[int],
    errors: list[str],
) -> None:
    try:
        await scenario(run)
    except (grpc.aio.AioRpcError, RuntimeError, KeyError, ValueError, OSError) as exc:
        errors.append(f"{scenario.__name__}: {describe_error(exc)}")
        print(f"gpu_check: {errors[-1]}", flush=True)
        run.figures += failed_figures(run.figures, errors[-1], numbers)
        if run.daemon.proc is None or run.daemon.proc.poll() is not None:
            await run.daemon.start()


async def check(args: argparse.Namespace, nvml: Nvml | FakeNvml, work: Path) -> dict[str, Any]:
    import scenarios

    base = nvml.mem(0)
    plan = Plan.for_device(base, args.alloc_fraction)
    port = free_port()
    config = work / "modeld.toml"
    (work / "models").mkdir(parents=True, exist_ok=True)
    (work / "reports").mkdir(exist_ok=True)
    fake = nvml if isinstance(nvml, FakeNvml) else None
    config.write_text(config_text(work, port, plan, base.total, fake))
    daemon = Daemon(config, f"127.0.0.1:{port}", work / "modeld.log")
    run = Run(nvml, base, plan, work, daemon)
    context = describe(nvml, base, plan)
    print(
        f"gpu_check: GPU 0 {nvml.names[0]}: {fig.fmt_bytes(base.free)} free of "
        f"{fig.fmt_bytes(base.total)}; each replica allocates {fig.fmt_bytes(plan.alloc)}, "
        f"memory_threshold {plan.threshold}",
        flush=True,
    )
    feeder = asyncio.ensure_future(fake.feeder()) if fake is not None else None
    errors: list[str] = []
    context["errors"] = errors
    try:
        async with asyncio.timeout(args.limit):
            await daemon.start()
            # Each scenario runs even when one before it failed: they start from Unload.
            for scenario, numbers in (
                (scenarios.first_cold_start, (5, 1, 2)),
                (scenarios.eviction, (3,)),
                (scenarios.release, (4,)),
            ):
                await run_scenario(run, scenario, numbers, errors)
    except Exception as exc:  # every failure becomes a failing figure, never a traceback alone
        errors.append(describe_error(exc))
        print(f"gpu_check: stopped early: {errors[-1]}", flush=True)
        run.figures += failed_figures(run.figures, errors[-1], range(1, 6))
    finally:
        await cleanup(run)
        if feeder is not None:
            feeder.cancel()
    context["per_replica_bytes"] = run.per_replica
    return fig.summary(run.figures, context)


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    if isinstance(exc, TimeoutError):
        return "the check ran past its --limit"
    return f"{type(exc).__name__}: {exc}"


def describe(nvml: Nvml | FakeNvml, base: Mem, plan: Plan) -> dict[str, Any]:
    return {
        "fake_gpu": isinstance(nvml, FakeNvml),
        "gpus": [
            f"{i}: {n} {u}" for i, (n, u) in enumerate(zip(nvml.names, nvml.uuids, strict=True))
        ],
        "baseline_free_bytes": base.free,
        "baseline_used_bytes": base.used,
        "total_bytes": base.total,
        "alloc_bytes": plan.alloc,
        "memory_estimate_bytes": plan.estimate,
        "memory_threshold": plan.threshold,
    }


async def cleanup(run: Run) -> None:
    """Stop the daemon if a scenario left it running, and any backend it left behind."""
    proc = run.daemon.proc
    if proc is not None and proc.poll() is None:
        await run.daemon.stop()
    for pid in sorted(run.pids):
        if pid_alive(pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write gpu_check.json and logs here")
    parser.add_argument("--alloc-fraction", type=float, default=0.35, metavar="F")
    parser.add_argument("--limit", type=float, default=240.0, metavar="SECONDS")
    parser.add_argument(
        "--fake-gpu", action="store_true", help="a pretend device: tries the script, proves nothing"
    )
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="gpu_check."))
    nvml: Nvml | FakeNvml
    try:
        nvml = FakeNvml(work) if args.fake_gpu else Nvml()
    except NoGpu as exc:
        print(f"gpu_check: no NVIDIA GPU here ({exc}); nothing checked")
        shutil.rmtree(work, ignore_errors=True)
        return 0
    try:
        result = asyncio.run(check(args, nvml, work))
    finally:
        nvml.close()
    text = fig.dumps(result)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.json").write_text(text)
        with contextlib.suppress(OSError):
            shutil.copy(work / "modeld.log", args.out / "modeld.log")
    print(fig.render(fig.figure_list(result)))
    print(text)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
