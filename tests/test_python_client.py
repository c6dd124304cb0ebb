"""modeld.client against the real daemon and real echo backends.

The sync client runs in a worker thread (asyncio.to_thread) so the test's loop
keeps draining the daemon's log; waits are on events, renewal counts and replica
events, each with a deadline.
"""

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from backend_proc import free_port
from daemon_proc import ECHO_CATALOG, DaemonProc, running_daemon, start_daemon, write_config
from modeld._proto.backend import backend_pb2, backend_pb2_grpc
from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld.client import (
    AsyncClient,
    BackendUnreachable,
    Client,
    Lease,
    PermissionDenied,
    Unavailable,
)
from pki import have_openssl, make_pki

# A hung backend is proven dead after probe_failures (3) failed probes spanning at
# least probe_window: a short window keeps the unreachable test short.
CATALOG = (
    ECHO_CATALOG.replace('stop_grace = "2s"\n', 'stop_grace = "2s"\nprobe_window = "1s"\n')
    + """
[models.short]
backend = "echo"
lease_ttl = "2s"
"""
)
TTL_S = 2.0


def in_flight(client: Client, model: str) -> int:
    listed = client.stub.ListReplicas(
        pb.ListReplicasRequest(model=model), metadata=client.metadata, timeout=10
    )
    return sum(r.in_flight for r in listed.replicas)


def backend_answers(lease: Lease, limit_s: float = 5.0) -> None:
    with grpc.insecure_channel(lease.address) as channel:
        stub = backend_pb2_grpc.BackendStub(channel)  # type: ignore[no-untyped-call]
        stub.Health(backend_pb2.HealthMessage(), timeout=limit_s)


async def test_a_lease_is_held_in_the_block_and_released_on_exit(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, CATALOG) as d:

        def use() -> tuple[Lease, int, int]:
            with Client(d.addr) as client:
                with client.lease("echo") as lease:
                    backend_answers(lease)
                    held = in_flight(client, "echo")
                return lease, held, in_flight(client, "echo")

        lease, held, after = await asyncio.to_thread(use)
        assert (held, after) == (1, 0)
        assert lease.protocol == "grpc"
        assert lease.address.startswith("127.0.0.1:")
        again = await d.stub.Release(pb.ReleaseRequest(lease_id=lease.lease_id))
        assert not again.released, "the block's exit released it already"


async def test_a_lease_is_released_when_the_block_raises(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, CATALOG) as d:

        def use() -> int:
            with Client(d.addr) as client:
                with pytest.raises(ValueError, match="caller's own bug"), client.lease("echo"):
                    raise ValueError("caller's own bug")
                return in_flight(client, "echo")

        assert await asyncio.to_thread(use) == 0


async def test_an_unreachable_backend_is_reported_and_replaced(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, CATALOG) as d, AsyncClient(d.addr) as client:
        events = d.stub.WatchEvents(pb.WatchEventsRequest(model="echo"))
        stopped = asyncio.ensure_future(
            _first(
                events, lambda e: e.to_state == pb.STOPPED and e.reason.startswith("unreachable")
            )
        )
        pid = 0
        try:
            with pytest.raises(BackendUnreachable) as raised:
                async with client.lease("echo") as lease:
                    pid = await _pid(d, lease.replica_id)
                    os.kill(pid, signal.SIGSTOP)  # a hung backend: connects, never answers
                    try:
                        await asyncio.to_thread(backend_answers, lease, 1.0)
                    except grpc.RpcError as exc:
                        raise lease.unreachable(exc) from exc
            assert isinstance(raised.value.__cause__, grpc.RpcError)
            event = await asyncio.wait_for(stopped, 20)
            assert event.replica_id == lease.replica_id
        finally:
            events.cancel()
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        async with client.lease("echo") as replaced:
            assert replaced.replica_id != lease.replica_id


async def test_the_sync_client_renews_a_lease_past_its_ttl(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, CATALOG) as d:

        def use() -> tuple[float, int, Lease]:
            with Client(d.addr) as client, client.lease("short") as lease:
                routed = time.monotonic()
                assert lease.wait_renewals(4, timeout=30), f"renewal stopped: {lease.lost}"
                held_for = time.monotonic() - routed
                return held_for, in_flight(client, "short"), lease

        held_for, held, lease = await asyncio.to_thread(use)
        assert held_for > TTL_S, "four renewals at TTL/3 take longer than one TTL"
        assert held == 1
        assert lease.lost is None


async def test_the_async_client_renews_a_lease_past_its_ttl(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, CATALOG) as d, AsyncClient(d.addr) as client:
        async with client.lease("short") as lease:
            routed = time.monotonic()
            assert await asyncio.to_thread(lease.wait_renewals, 4, 30), lease.lost
            assert time.monotonic() - routed > TTL_S
            renewed = await d.stub.RenewLease(pb.RenewLeaseRequest(lease_id=lease.lease_id))
            assert renewed.lease_expires_at.seconds > 0, "still held after more than one TTL"
        listed = await d.stub.ListReplicas(pb.ListReplicasRequest(model="short"))
        assert [r.in_flight for r in listed.replicas] == [0]


async def test_a_route_is_retried_once_when_the_daemon_was_unavailable(tmp_path: Path) -> None:
    port = free_port()
    failed = threading.Event()
    seen: list[grpc.StatusCode] = []

    def first_failure(exc: grpc.RpcError) -> None:
        seen.append(exc.code())  # type: ignore[attr-defined]
        failed.set()

    def route() -> Lease:
        with Client(f"127.0.0.1:{port}", retry_delay=0.1, on_retry=first_failure) as client:
            return client.route("echo")

    routing = asyncio.ensure_future(asyncio.to_thread(route))
    assert await asyncio.to_thread(failed.wait, 30), "the first Route did not fail"
    assert not routing.done()
    async with running_daemon(tmp_path, CATALOG, port=port) as d:
        lease = await asyncio.wait_for(routing, 60)
        assert seen == [grpc.StatusCode.UNAVAILABLE]
        assert (await d.stub.Release(pb.ReleaseRequest(lease_id=lease.lease_id))).released


BROKEN = """
[models.broken]
backend = "broken"
[backends.broken]
command = ["{python}", "-m", "modeld.backends.echo", "--addr", "{addr}", "--exit-on-start", "3"]
"""


async def test_a_failed_start_is_not_started_again_and_unreachable_on_raises_as_documented(
    tmp_path: Path,
) -> None:
    async with running_daemon(tmp_path, CATALOG + BROKEN) as d:
        retried: list[grpc.RpcError] = []

        def route_broken() -> None:
            with Client(d.addr, retry_delay=0.1, on_retry=retried.append) as client:
                client.route("broken")

        with pytest.raises(Unavailable, match="failed to start"):
            await asyncio.to_thread(route_broken)
        assert retried == [], "the client started the failed model again"
        spawns = [
            e
            for e in d.log
            if e.get("event") == "replica_state"
            and str(e.get("reason", "")).startswith("spawned pid")
        ]
        assert len(spawns) == 1

        # unreachable_on: released as BACKEND_UNREACHABLE, raised as BackendUnreachable
        # with the block's own exception as its cause, in both clients.
        def lease_sync() -> BaseException:
            with Client(d.addr) as client:
                with (
                    pytest.raises(BackendUnreachable) as raised,
                    client.lease("echo", unreachable_on=(ConnectionError,)),
                ):
                    raise ConnectionResetError("peer reset")
                assert in_flight(client, "echo") == 0
                return raised.value

        raised = await asyncio.to_thread(lease_sync)
        assert isinstance(raised.__cause__, ConnectionResetError)
        async with AsyncClient(d.addr) as aclient:
            with pytest.raises(BackendUnreachable) as araised:
                async with aclient.lease("echo", unreachable_on=(ConnectionError,)):
                    raise ConnectionResetError("peer reset")
            assert isinstance(araised.value.__cause__, ConnectionResetError)
            listed = await d.stub.ListReplicas(pb.ListReplicasRequest(model="echo"))
            assert [r.in_flight for r in listed.replicas] == [0]


async def test_a_route_right_after_a_replica_crash_gets_a_new_replica(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, CATALOG) as d, AsyncClient(d.addr) as client:
        async with client.lease("echo") as first:
            pid = await _pid(d, first.replica_id)
        os.kill(pid, signal.SIGKILL)
        await d.wait_log(
            lambda e: (
                e.get("event") == "replica_state"
                and e.get("replica_id") == first.replica_id
                and e.get("to_state") == "FAILED"
            ),
            limit_s=20,
        )
        async with client.lease("echo") as second:
            assert second.replica_id != first.replica_id
            await asyncio.to_thread(backend_answers, second)


async def test_tls_and_a_token_file_as_the_cli_takes_them(tmp_path: Path) -> None:
    if not have_openssl():
        pytest.skip("the openssl command is not installed; it makes the test certificates")
    (tmp_path / "pki").mkdir()
    pki = make_pki(tmp_path / "pki")
    token = tmp_path / "token"
    token.write_text("# for the client\n" + "t" * 32 + "\n")
    wrong = tmp_path / "wrong"
    wrong.write_text("w" * 32 + "\n")
    body = (
        f'tls_cert = "{pki / "server.crt"}"\ntls_key = "{pki / "server.key"}"\n'
        f'auth_token_file = "{token}"\n' + ECHO_CATALOG
    )
    config, addr = write_config(tmp_path, body)
    ca = grpc.ssl_channel_credentials((pki / "ca.crt").read_bytes())
    d = await start_daemon(config, addr, creds=ca)
    try:
        tls = {"tls_ca": str(pki / "ca.crt")}
        async with (
            AsyncClient(addr, token_file=str(token), **tls) as client,
            client.lease("echo") as lease,
        ):
            assert lease.address
        async with AsyncClient(addr, token_file=str(wrong), **tls) as client:
            with pytest.raises(PermissionDenied) as refused:
                await client.route("echo")
            assert refused.value.status is grpc.StatusCode.UNAUTHENTICATED
    finally:
        await d.stop()


async def test_the_address_comes_from_modeld_addr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELD_ADDR", "127.0.0.1:1")
    with Client() as client:
        assert client.addr == "127.0.0.1:1"
    async with AsyncClient("unix:///tmp/x.sock") as aclient:
        assert aclient.addr == "unix:///tmp/x.sock"


async def _pid(d: DaemonProc, replica_id: str) -> int:
    listed = await d.stub.ListReplicas(pb.ListReplicasRequest())
    return next(r.pid for r in listed.replicas if r.id == replica_id)


async def _first(
    events: "grpc.aio.UnaryStreamCall[pb.WatchEventsRequest, pb.Event]",
    match: Callable[[pb.Event], bool],
) -> pb.Event:
    async for event in events:
        if match(event):
            return event
    raise AssertionError("the event stream ended")
