"""Hosts on separate network addresses: each daemon in its own network namespace.

A bridge in the root namespace links one veth pair per namespace; PostgreSQL
(listening on loopback only) is reached through a relay (tests/faultproxy.py)
on the bridge's address. Cutting a host off is `ip link set ... down` of its
veth: packets vanish, nothing is refused, as when a machine drops off a network.

Needs root and `ip netns`; without them the tests skip with one line, unless
MODELD_REQUIRE_NETNS=1 (CI), where that is a failure. Names are unique per run
and everything is deleted even when a test fails.
"""

import asyncio
import contextlib
import os
import random
import re
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest

from cluster_proc import HOST_TTL, after, db_rows, event, load_on, running_cluster, sees_ready
from daemon_proc import ECHO_CATALOG, DaemonProc
from faultproxy import FaultProxy
from modeld._proto.modeld.v1 import modeld_pb2 as pb

pytestmark = pytest.mark.timeout(180)
# max_replicas counts the whole cluster: echo on b and on c needs two (ECHO_CATALOG
# ends inside its [models.echo] table).
ECHO_ON_EVERY_HOST = ECHO_CATALOG + "max_replicas = 3\n"


def ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], check=True, capture_output=True, text=True)
    return done.stdout


class Namespaces:
    """`count` network namespaces on one bridge; host i has `address(i)`."""

    def __init__(self, count: int) -> None:
        # The creating process's pid is in every name, so that a later run can sweep
        # what a killed run left (sweep_left_over); the random part tells runs of
        # one process apart. At most 12 + 1 characters: link names stop at 15.
        tag = f"{os.getpid():x}{uuid.uuid4().hex[:2]}"
        self.bridge = f"mdb{tag}"
        self.names = [f"modeld-{tag}-{i}" for i in range(count)]
        self._veths = [f"mdv{tag}{i}" for i in range(count)]
        taken = ip("-4", "addr")
        while True:
            self._net = f"10.{random.randint(200, 250)}.{random.randint(0, 255)}"
            if f"inet {self._net}." not in taken:
                break
        self.gateway = f"{self._net}.1"

    def address(self, i: int) -> str:
        return f"{self._net}.{i + 2}"

    def host(self, i: int) -> tuple[str, str]:
        return self.names[i], self.address(i)

    def create(self) -> None:
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for i, (name, veth) in enumerate(zip(self.names, self._veths, strict=True)):
            ip("netns", "add", name)
            inner = f"{veth}p"
            ip("link", "add", veth, "type", "veth", "peer", "name", inner)
            ip("link", "set", inner, "netns", name)
            ip("link", "set", veth, "master", self.bridge, "up")
            ip("-n", name, "addr", "add", f"{self.address(i)}/24", "dev", inner)
            ip("-n", name, "link", "set", inner, "up")
            ip("-n", name, "link", "set", "lo", "up")

    def cut(self, i: int) -> None:
        ip("link", "set", self._veths[i], "down")

    def reconnect(self, i: int) -> None:
        ip("link", "set", self._veths[i], "up")

    def sysctl(self, i: int, key: str, value: str) -> None:
        subprocess.run(
            ["ip", "netns", "exec", self.names[i], "sysctl", "-q", "-w", f"{key}={value}"],
            check=True,
            capture_output=True,
        )

    def delete(self) -> None:
        # Deleting a namespace deletes its end of the veth pair, and so the pair.
        for name in self.names:
            with contextlib.suppress(subprocess.CalledProcessError):
                ip("netns", "delete", name)
        for veth in self._veths:
            with contextlib.suppress(subprocess.CalledProcessError):
                ip("link", "delete", veth)
        with contextlib.suppress(subprocess.CalledProcessError):
            ip("link", "delete", self.bridge)


_OURS = re.compile(r"(?:modeld-|mdb)([0-9a-f]+)[0-9a-f]{2}\b")


def sweep_left_over() -> None:
    """Delete namespaces and bridges of earlier runs whose process is gone (a run
    killed outright never reaches its own clean-up)."""
    names = [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]
    bridges = [
        line.split(":")[1].strip()
        for line in ip("-o", "link", "show", "type", "bridge").splitlines()
    ]
    for name in names + bridges:
        found = _OURS.match(name)
        if found is None or Path(f"/proc/{int(found[1], 16)}").exists():
            continue
        with contextlib.suppress(subprocess.CalledProcessError):
            if name in names:
                ip("netns", "delete", name)
            else:
                ip("link", "delete", name)


def _why_no_netns() -> str | None:
    if os.geteuid() != 0:
        return "not root"
    if shutil.which("ip") is None:
        return "no `ip` command"
    try:
        ip("netns", "list")
    except subprocess.CalledProcessError as exc:
        return f"`ip netns` does not work: {exc.stderr.strip()}"
    return None


_WHY_NOT = _why_no_netns()
if _WHY_NOT is not None:
    # Once for the whole module: one line, not one per test.
    _MESSAGE = f"cluster network namespace tests need root and `ip netns`: {_WHY_NOT}"
    if os.environ.get("MODELD_REQUIRE_NETNS") == "1":
        pytest.fail(_MESSAGE + " (MODELD_REQUIRE_NETNS=1)", pytrace=False)
    pytest.skip(_MESSAGE + "; skipped", allow_module_level=True)


@pytest.fixture
def spaces() -> Iterator[Namespaces]:
    sweep_left_over()
    made = Namespaces(3)
    try:
        made.create()
        yield made
    finally:
        made.delete()


async def relay(pg_dsn: str, spaces: Namespaces) -> FaultProxy:
    """PostgreSQL as the namespaces see it: a relay on the bridge's address."""
    target = urlsplit(pg_dsn)
    return await FaultProxy.start(
        target.hostname or "127.0.0.1", target.port or 5432, listen=spaces.gateway
    )


async def routes_land(via: DaemonProc, count: int) -> list[pb.RouteResponse]:
    """`count` Route+Release pairs through `via`; every one must succeed."""
    replies = []
    for _ in range(count):
        reply = await via.stub.Route(pb.RouteRequest(model="echo"), timeout=15)
        await via.stub.Release(pb.ReleaseRequest(lease_id=reply.lease_id), timeout=15)
        replies.append(reply)
    return replies


@pytest.mark.long
async def test_host_cut_off_its_network_is_routed_around_then_rejoins(
    tmp_path: Path, pg_dsn: str, spaces: Namespaces
) -> None:
    proxy = await relay(pg_dsn, spaces)
    try:
        netns = [spaces.host(i) for i in range(3)]
        async with running_cluster(
            tmp_path, proxy.dsn(pg_dsn), "abc", netns=netns, catalog=ECHO_ON_EVERY_HOST
        ) as hosts:
            a, b, c = hosts["a"], hosts["b"], hosts["c"]
            on_b, on_c = await load_on(a, "b"), await load_on(a, "c")
            # Backends bind to their host's own address (backend_host from advertise).
            assert on_b.address.startswith(spaces.address(1) + ":"), on_b.address
            assert on_c.address.startswith(spaces.address(2) + ":"), on_c.address
            for replica, owner in ((on_b, "b"), (on_c, "c")):
                await a.wait_log(sees_ready(owner, replica.id), 10)
            first = await b.wait_log(event("cluster_registered"), 5)
            assert await held(a, 2) == {on_b.id, on_c.id}

            reaped = [after(d, event("cluster_host_reaped", host_id="b")) for d in (a, c)]
            loop = asyncio.get_running_loop()
            cut_at = loop.time()
            spaces.cut(1)
            # Until b's lease runs out a Route may still try b (and, timing out, retry c).
            while loop.time() < cut_at + HOST_TTL + 1:
                assert (await routes_land(a, 1))[0].replica_id == on_c.id
            # From host_ttl + 1 s on, nobody even tries b.
            tried_b = after(a, event("cluster_forward_retry", replica_id=on_b.id))
            began = loop.time()
            for via in (a, c, a, c):
                assert {r.replica_id for r in await routes_land(via, 5)} == {on_c.id}
            assert not [e for e in a.log if tried_b(e)]
            print(f"10 Route+Release pairs after the cut took {loop.time() - began:.3f} s")
            await asyncio.wait(
                [
                    asyncio.ensure_future(d.wait_log(m, 15))
                    for d, m in zip((a, c), reaped, strict=True)
                ],
                return_when=asyncio.FIRST_COMPLETED,
            )
            for daemon in (a, c):
                await daemon.wait_log(
                    lambda e: e.get("event") == "cluster_view_changed" and "b" not in e["hosts"],
                    10,
                )

            # Back on the network: fenced (its row was reaped), a new epoch, one row.
            rejoined = after(b, event("cluster_registered"))
            spaces.reconnect(1)
            again = await b.wait_log(rejoined, 20)
            assert again["epoch"] > first["epoch"] and again["replicas"] == 1
            for daemon in (a, c):
                view = await daemon.wait_log(
                    lambda e: (
                        e.get("event") == "cluster_view_changed"
                        and e["hosts"].get("b") == again["epoch"]
                        and f"b/{on_b.id}" in e["ready"]
                    ),
                    15,
                )
                assert sorted(view["ready"]) == sorted([f"b/{on_b.id}", f"c/{on_c.id}"])
            rows = await db_rows(pg_dsn, "SELECT replica_id, host_id, epoch FROM modeld_replicas")
            assert sorted((r["replica_id"], r["host_id"], r["epoch"]) for r in rows) == sorted(
                [(on_b.id, "b", again["epoch"]), (on_c.id, "c", c_epoch(c))]
            )
            # Never one replica twice in any view, across the whole run.
            for daemon in hosts.values():
                for entry in daemon.log:
                    if entry.get("event") == "cluster_view_changed":
                        ids = [r.split("/", 1)[1] for r in entry["ready"]]
                        assert len(ids) == len(set(ids)), entry
            # b serves again: a Route on b (local first), and forwarded to it from a
            # (published in-flight figures may lag a second: hold a few leases).
            assert (await routes_land(b, 1))[0].replica_id == on_b.id
            assert await held(a, 4) == {on_b.id, on_c.id}
    finally:
        await proxy.close()


async def held(via: DaemonProc, count: int) -> set[str]:
    """`count` leases held at once through `via` (its own count spreads them over
    replicas), then released: the replicas they landed on."""
    replies = [
        await via.stub.Route(pb.RouteRequest(model="echo"), timeout=15) for _ in range(count)
    ]
    for reply in replies:
        released = await via.stub.Release(pb.ReleaseRequest(lease_id=reply.lease_id), timeout=15)
        assert released.released
    return {r.replica_id for r in replies}


def c_epoch(daemon: DaemonProc) -> int:
    registered = [e for e in daemon.log if e.get("event") == "cluster_registered"]
    return int(registered[-1]["epoch"])


async def test_reused_backend_address_is_never_routed_under_the_old_identity(
    tmp_path: Path, pg_dsn: str, spaces: Namespaces
) -> None:
    """kill -9 of a backend; its replacement binds the very same address (modeld's
    backend_ports narrowed to one port), while a's view, frozen by a database outage
    of a's own, still holds the old replica id + generation."""
    proxy = await relay(pg_dsn, spaces)
    a_proxy = await relay(pg_dsn, spaces)
    try:
        dsns = [a_proxy.dsn(pg_dsn), proxy.dsn(pg_dsn)]
        netns = [spaces.host(0), spaces.host(1)]
        one_port = 'backend_ports = "27500-27500"\n' + ECHO_CATALOG
        async with running_cluster(tmp_path, dsns, "ab", netns=netns, catalog=one_port) as hosts:
            a, b = hosts["a"], hosts["b"]
            old = await load_on(b, "b")
            await a.wait_log(sees_ready("b", old.id), 10)
            # No TIME_WAIT, which would hold the port after the kill.
            spaces.sysctl(1, "net.ipv4.tcp_max_tw_buckets", "0")
            down = after(a, event("cluster_db_down"))
            a_proxy.cut()
            await a.wait_log(down, 10)
            os.kill(old.pid, signal.SIGKILL)
            await crashed(b, old)
            new = await load_on(b, "b")
            assert new.address == old.address and new.id != old.id, (old, new)

            # a still believes in the old (id, generation): b refuses that identity, and
            # a, with no other replica and no database to start one, says so.
            refused = after(a, event("cluster_forward_retry", replica_id=old.id))
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await a.stub.Route(pb.RouteRequest(model="echo"), timeout=15)
            assert failed.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "cluster database" in (failed.value.details() or "")
            why = (await a.wait_log(refused, 5))["error"]
            assert old.id in why and "route elsewhere" in why, why
            listed = await b.stub.ListReplicas(pb.ListReplicasRequest(model="echo"), timeout=5)
            assert [(r.id, r.in_flight) for r in listed.replicas if r.state == pb.READY] == [
                (new.id, 0)
            ]

            # a's database is back: it reads the new replica and routes to it.
            renewed = after(a, sees_ready("b", new.id))
            a_proxy.restore()
            view = await a.wait_log(renewed, 15)
            assert f"b/{old.id}" not in view["ready"]
            reply = await a.stub.Route(pb.RouteRequest(model="echo"), timeout=15)
            assert reply.replica_id == new.id and reply.address == old.address
            assert reply.lease_id.startswith("b~")
    finally:
        await proxy.close()
        await a_proxy.close()


def spawn_of(entry: dict[str, Any]) -> bool:
    return str(entry.get("reason", "")).startswith("spawned pid ")


async def crashed(daemon: DaemonProc, old: pb.Replica) -> None:
    """Wait until `daemon` has seen the backend of `old` die."""
    loop = asyncio.get_running_loop()
    until = loop.time() + 30
    while True:
        listed = await daemon.stub.ListReplicas(pb.ListReplicasRequest(model="echo"), timeout=5)
        if all(r.state != pb.READY for r in listed.replicas if r.id == old.id):
            return
        assert loop.time() < until, listed
        await asyncio.sleep(0.1)
