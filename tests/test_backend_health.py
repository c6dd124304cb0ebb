"""What a start makes of an HTTP server's health answers and of its output, against the
real daemon and the http test backend (tests/backends/http_backend.py).

One daemon serves the whole module; each model is a server that misbehaves one way:
a health path it does not have (404), loading quietly (503 and nothing printed), an
access line for every probe, loader output on stderr before a flood on stdout, and
two replicas whose health answers the test holds back, as a server busy with
completions does (issue 21, findings 1-5).
"""

import asyncio
import collections
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from backend_proc import free_port
from daemon_proc import DaemonProc, running_daemon
from modeld._proto.modeld.v1 import modeld_pb2 as pb

pytestmark = pytest.mark.asyncio(loop_scope="module")

BACKEND = Path(__file__).parent / "backends" / "http_backend.py"
RING_LINES = 400
WAIT_S = 30.0
HEAD_LINES = 300


def server(name: str, *flags: str, **keys: str) -> str:
    extra = "".join(f', "{f}"' for f in flags)
    settings = "".join(f'{k} = "{v}"\n' for k, v in keys.items())
    return f"""
[backends.{name}]
command = ["{{python}}", "{BACKEND}", "--host", "{{host}}", "--port", "{{port}}",
           "--model", "{{model_file}}", "--ready-file", "{{model_file}}"{extra}]
protocol = "http"
health_path = "/health"
stop_grace = "2s"
start_attempts = 1
{settings}[models.{name}]
backend = "{name}"
model_file = "tiny.gguf"
"""


def catalog(control: Path, metrics_port: int) -> str:
    return (
        f'metrics_listen = "127.0.0.1:{metrics_port}"\n'
        f"[logs]\nring_lines = {RING_LINES}\n"
        + server(
            "busy",
            "--control-dir",
            str(control),
            "--quiet",
            probe_timeout="600ms",
            probe_failures="3",
            probe_window="1500ms",
        )
        + "max_replicas = 2\n"
        + server("wrong_path", "--health-path", "/v1/models", ready_ceiling="10s")
        + server(
            "quiet_loader",
            "--quiet",
            "--ready-after",
            "3.5",
            ready_timeout="2s",
        )
        + server(
            "probe_logger",
            "--ready-file",
            "/nonexistent/ready",
            "--not-ready-status",
            "500",
            ready_timeout="2s",
            ready_ceiling="15s",
        )
        + server(
            "stderr_then_stdout",
            "--head",
            "5",
            "--chatty-stdout",
            "300",
            "--quiet",
            "--ready-file",
            "/nonexistent/ready",
            "--not-ready-status",
            "500",
            ready_timeout="2s",
            ready_ceiling="15s",
        )
        + server("long_loader", "--head", "600", "--chatty-stdout", "1000")
        + """
[backends.stdout_only]
command = ["{python}", "-c", "print('stdout says why'); raise SystemExit(3)"]
[models.stdout_only]
backend = "stdout_only"
"""
    )


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the test tells the busy servers to hold their health answers."""
    return tmp_path_factory.mktemp("control")


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def daemon(
    tmp_path_factory: pytest.TempPathFactory, control: Path, metrics_port: int
) -> AsyncIterator[DaemonProc]:
    tmp_path = tmp_path_factory.mktemp("health")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny.gguf").write_bytes(b"GGUF")
    async with running_daemon(tmp_path, catalog(control, metrics_port)) as d:
        yield d


class Events:
    """The daemon's replica events, read in order by whoever waits for one."""

    def __init__(self, d: DaemonProc) -> None:
        self._stream = d.stub.WatchEvents(pb.WatchEventsRequest(model="busy"))
        self._iter: AsyncIterator[pb.Event] = aiter(self._stream)

    @classmethod
    async def watch(cls, d: DaemonProc) -> "Events":
        """Subscribed once this returns (a Ping follows the call in order)."""
        events = cls(d)
        await d.stub.Ping(pb.PingRequest(), timeout=10)
        return events

    async def next_of(self, replica_id: str) -> pb.Event:
        async def one() -> pb.Event:
            async for event in self._iter:
                if event.replica_id == replica_id:
                    return event
            raise AssertionError("the event stream ended")

        return await asyncio.wait_for(one(), WAIT_S)

    def close(self) -> None:
        self._stream.cancel()


async def replicas(d: DaemonProc) -> dict[str, pb.Replica]:
    listed = await d.stub.ListReplicas(pb.ListReplicasRequest(model="busy"))
    return {r.id: r for r in listed.replicas}


def judgments(port: int) -> dict[str, float]:
    return {j: metric(port, j) for j in ("SUSPECT", "HEALTHY", "DEAD")}


def metric(port: int, judgment: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    prefix = f'modeld_replica_health_total{{judgment="{judgment}"}} '
    return next(
        (float(ln.removeprefix(prefix)) for ln in text.splitlines() if ln.startswith(prefix)), 0.0
    )


async def log_texts(d: DaemonProc, tail: int, **target: str) -> list[str]:
    request = pb.StreamLogsRequest(tail=tail, **target)
    return [line.text async for line in d.stub.StreamLogs(request, timeout=30)]


async def failed_route(d: DaemonProc, model: str) -> grpc.aio.AioRpcError:
    try:
        await d.stub.Route(pb.RouteRequest(model=model), timeout=60)
    except grpc.aio.AioRpcError as exc:
        return exc
    raise AssertionError(f"a Route to {model} was granted")


async def test_a_health_path_answering_404_fails_the_start_at_once(daemon: DaemonProc) -> None:
    loop = asyncio.get_running_loop()
    began = loop.time()
    exc = await failed_route(daemon, "wrong_path")
    waited = loop.time() - began
    assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc.details()
    details = exc.details() or ""
    assert "404" in details
    assert "/health" in details and "http://127.0.0.1:" in details
    assert "backends.wrong_path.health_path" in details
    # Not waited out until the ceiling (10 s): the first probe's answer was enough.
    assert waited < 10.0


async def test_a_503_while_loading_is_progress_even_when_nothing_is_printed(
    daemon: DaemonProc,
) -> None:
    # The server loads for 3.5 s on its own clock, printing nothing, with ready_timeout 2 s
    # (more than a loaded machine may take to start Python, which is no progress either).
    lease = await daemon.stub.Route(pb.RouteRequest(model="quiet_loader"), timeout=60)
    assert lease.cold_start
    await daemon.stub.Release(pb.ReleaseRequest(lease_id=lease.lease_id))


async def test_access_lines_of_probes_are_not_progress(daemon: DaemonProc) -> None:
    exc = await failed_route(daemon, "probe_logger")
    details = exc.details() or ""
    assert exc.code() == grpc.StatusCode.UNAVAILABLE
    assert "no progress for ready_timeout" in details, details
    texts = await log_texts(daemon, RING_LINES, model="probe_logger")
    probes = [text for text in texts if text == "GET /health 500"]
    # Backing off to 250 ms between probes, a wait of ~2 s probes about a dozen times,
    # not every 20 ms as when each access line cut the pause short.
    assert 1 <= len(probes) < 40, len(probes)


async def test_a_failed_start_quotes_its_stderr_behind_a_flood_of_stdout(
    daemon: DaemonProc,
) -> None:
    exc = await failed_route(daemon, "stderr_then_stdout")
    details = exc.details() or ""
    assert "wrote nothing to stderr" not in details, details
    assert "loader line 4" in details
    assert "http_backend listening" in details


async def test_a_failed_start_with_nothing_on_stderr_quotes_stdout(daemon: DaemonProc) -> None:
    exc = await failed_route(daemon, "stdout_only")
    details = exc.details() or ""
    assert "stdout says why" in details, details
    assert "nothing to stderr" in details


async def test_the_ring_keeps_the_head_of_a_start_behind_a_chatty_server(
    daemon: DaemonProc,
) -> None:
    lease = await daemon.stub.Route(pb.RouteRequest(model="long_loader"), timeout=60)
    await daemon.stub.Release(pb.ReleaseRequest(lease_id=lease.lease_id))
    texts = await log_texts(daemon, 5000, replica_id=lease.replica_id)
    # The start's first 300 lines (head_lines' default: the daemon's spawn note, then
    # the loader's), one marker, then the newest RING_LINES lines.
    marker = next(i for i, text in enumerate(texts) if text.endswith("lines dropped"))
    assert marker == HEAD_LINES, texts[marker - 2 : marker + 2]
    assert texts[0].startswith("spawned pid") and texts[1] == "loader line 0"
    assert texts[marker - 1] == f"loader line {HEAD_LINES - 2}"
    assert "chatter line 999" in texts[marker + 1 :]
    assert len(texts) == HEAD_LINES + 1 + RING_LINES


async def test_a_busy_replica_is_suspect_not_stopped_until_proven_dead(
    daemon: DaemonProc, control: Path, metrics_port: int
) -> None:
    """Finding 1: one slow probe, or one client's report, stopped a busy replica."""
    d = daemon
    before = await asyncio.to_thread(judgments, metrics_port)
    await d.stub.Load(pb.LoadRequest(model="busy", replicas=2), timeout=WAIT_S)
    leases = [await d.stub.Route(pb.RouteRequest(model="busy")) for _ in range(4)]
    busy = collections.Counter(lease.replica_id for lease in leases).most_common(1)[0][0]
    mine = [lease for lease in leases if lease.replica_id == busy]
    assert len(mine) >= 2, "four leases on two replicas"
    other = next(rid for rid in await replicas(d) if rid != busy)
    pid = (await replicas(d))[busy].pid
    hang = control / f"hang-{mine[0].address.rsplit(':', 1)[1]}"
    events = await Events.watch(d)
    try:
        # Its health answers wait behind its (pretend) queue; a client times out.
        hang.touch()
        await d.stub.Release(
            pb.ReleaseRequest(lease_id=mine[0].lease_id, outcome=pb.BACKEND_UNREACHABLE)
        )
        event = await events.next_of(busy)
        assert (event.health, event.to_state) == ("SUSPECT", pb.READY), event
        assert "unreachable" in event.reason
        listed = (await replicas(d))[busy]
        assert listed.state == pb.READY and listed.suspect, listed
        # Its lease is still good, and new Routes go to the other replica.
        await d.stub.RenewLease(pb.RenewLeaseRequest(lease_id=mine[1].lease_id))
        routed = [await d.stub.Route(pb.RouteRequest(model="busy")) for _ in range(3)]
        assert {lease.replica_id for lease in routed} == {other}
        for lease in routed:
            await d.stub.Release(pb.ReleaseRequest(lease_id=lease.lease_id))

        # The queue empties: the next probe answers and clears it.
        hang.unlink()
        event = await events.next_of(busy)
        assert (event.health, event.to_state) == ("HEALTHY", pb.READY), event
        listed = (await replicas(d))[busy]
        assert (listed.state, listed.suspect, listed.pid) == (pb.READY, "", pid)
        await d.stub.RenewLease(pb.RenewLeaseRequest(lease_id=mine[1].lease_id))

        # It stops answering for good: a failed health probe makes it suspect; once its
        # clients have let go of it (failed probes of a replica holding leases prove
        # nothing), failures in a row over probe_window prove it dead, and only then
        # is it stopped.
        hang.touch()
        await d.stub.Health(pb.HealthRequest(model="busy", probe=True), timeout=WAIT_S)
        event = await events.next_of(busy)
        assert (event.health, event.to_state) == ("SUSPECT", pb.READY), event
        assert "health probe failed" in event.reason
        for lease in mine[1:]:
            await d.stub.Release(pb.ReleaseRequest(lease_id=lease.lease_id))
        event = await events.next_of(busy)
        assert (event.health, event.to_state) == ("DEAD", pb.READY), event
        assert "3 probes in a row failed" in event.reason
        event = await events.next_of(busy)
        assert event.to_state in (pb.DRAINING, pb.STOPPING), event
        hang.unlink()
    finally:
        events.close()
    after = await asyncio.to_thread(judgments, metrics_port)
    assert {k: after[k] - before[k] for k in after} == {"SUSPECT": 2, "HEALTHY": 1, "DEAD": 1}
    for lease in leases:
        if lease.replica_id == other:
            await d.stub.Release(pb.ReleaseRequest(lease_id=lease.lease_id))


async def refused(address: str) -> None:
    """Returns once a connection to `address` is refused (its listener is gone)."""
    host, port = address.rsplit(":", 1)
    async with asyncio.timeout(WAIT_S):
        while True:
            try:
                _, writer = await asyncio.open_connection(host, int(port))
            except ConnectionRefusedError:
                return
            except ConnectionResetError:
                # A connection queued as the listener closed: the next one is refused.
                continue
            writer.close()
            await asyncio.sleep(0.02)


async def test_a_replica_whose_port_refuses_connections_is_dead_at_once(
    daemon: DaemonProc, control: Path
) -> None:
    lease = await daemon.stub.Route(pb.RouteRequest(model="busy"), timeout=WAIT_S)
    (control / f"refuse-{lease.address.rsplit(':', 1)[1]}").touch()
    await refused(lease.address)
    events = await Events.watch(daemon)
    try:
        await daemon.stub.Health(pb.HealthRequest(model="busy", probe=True), timeout=WAIT_S)
        event = await events.next_of(lease.replica_id)
        assert event.health == "SUSPECT", event
        event = await events.next_of(lease.replica_id)
        assert event.health == "DEAD", event
        assert "refuses connections" in event.reason
    finally:
        events.close()
