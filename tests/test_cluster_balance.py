"""The balance property with 3 real daemons and real PostgreSQL: load spread over
the 3 modelds, evenly or skewed onto one, keeps the in-flight of the 3 replicas (one
per host) within 2 of each other at every sample. Also the forwarding pieces it
rests on: the owner's decline of a bounded forward, and the forwarder's channel to
a host closed once that host has left the view.

Load is bounded and slow on purpose, so that a loaded 2-core machine keeps up: a
fixed number of clients, each holding its lease for HOLD_S (its "work") and then
releasing it through the same modeld, starts staggered over one hold time so that
releases do not come in waves. A sampler reads each host's own replica from its
ListReplicas (the three reads concurrently) every SAMPLE_EVERY_S. With local-first
routing the skewed run fails at once (the busy modeld's replica holds most leases).
"""

import asyncio
import contextlib
from collections.abc import Mapping
from pathlib import Path

import pytest

from cluster_proc import running_cluster, start_host
from daemon_proc import DaemonProc
from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld.cluster.marker import Marker

pytestmark = pytest.mark.timeout(180)

HOLD_S = 1.0
CLIENTS = 12
RUN_S = 6.0
SAMPLE_EVERY_S = 0.1
BOUND = 2
# max_replicas counts the whole cluster: one replica on each of three hosts needs three.
TRIO = '[models.trio]\nbackend = "echo"\nmax_replicas = 3\n'


async def client(daemon: DaemonProc, start_after: float, stop: asyncio.Event) -> int:
    """Route, hold, release, until `stop`; returns how many leases it held."""
    await asyncio.sleep(start_after)
    held = 0
    while not stop.is_set():
        lease = await daemon.stub.Route(pb.RouteRequest(model="trio"), timeout=30)
        await asyncio.sleep(HOLD_S)
        reply = await daemon.stub.Release(pb.ReleaseRequest(lease_id=lease.lease_id), timeout=30)
        assert reply.released, lease.lease_id
        held += 1
    return held


async def in_flight(hosts: Mapping[str, DaemonProc], owned: Mapping[str, str]) -> dict[str, int]:
    """Each host's own replica as that host reports it (exact, not a published figure)."""

    async def one(name: str) -> int:
        reply = await hosts[name].stub.ListReplicas(
            pb.ListReplicasRequest(model="trio", local=True), timeout=10
        )
        return next(r.in_flight for r in reply.replicas if r.id == owned[name])

    counts = await asyncio.gather(*(one(name) for name in owned))
    return dict(zip(owned, counts, strict=True))


async def run_load(
    hosts: Mapping[str, DaemonProc], owned: Mapping[str, str], spread: Mapping[str, int]
) -> list[dict[str, int]]:
    stop = asyncio.Event()
    names = [name for name, n in spread.items() for _ in range(n)]
    # Interleaved, so each host's clients are spread over the stagger too.
    order = sorted(range(len(names)), key=lambda i: (i % spread[names[i]], i))
    tasks = [
        asyncio.ensure_future(client(hosts[names[i]], k * HOLD_S / len(names), stop))
        for k, i in enumerate(order)
    ]
    samples: list[dict[str, int]] = []
    try:
        loop = asyncio.get_running_loop()
        until = loop.time() + RUN_S
        while loop.time() < until:
            samples.append(await in_flight(hosts, owned))
            await asyncio.sleep(SAMPLE_EVERY_S)
        stop.set()
        held = await asyncio.wait_for(asyncio.gather(*tasks), 60)
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*tasks, return_exceptions=True)
    assert sum(held) >= len(names) * 2, held
    return samples


@pytest.mark.parametrize(
    "spread",
    [{"a": 4, "b": 4, "c": 4}, {"a": CLIENTS - 2, "b": 1, "c": 1}],
    ids=["even", "skewed"],
)
@pytest.mark.long
async def test_in_flight_stays_balanced_over_three_hosts(
    tmp_path: Path, pg_dsn: str, spread: dict[str, int]
) -> None:
    async with running_cluster(tmp_path, pg_dsn, ["a", "b", "c"], extra=TRIO) as hosts:
        owned = {}
        for name, daemon in hosts.items():
            reply = await daemon.stub.Load(pb.LoadRequest(model="trio"), timeout=30)
            owned[name] = reply.replicas[0].id
        everyone = {f"{name}/{rid}" for name, rid in owned.items()}
        for daemon in hosts.values():
            await daemon.wait_log(
                lambda e: (
                    e.get("event") == "cluster_view_changed" and everyone <= set(e.get("ready", []))
                ),
                20,
            )
        samples = await run_load(hosts, owned, spread)
        bad = [s for s in samples if max(s.values()) - min(s.values()) > BOUND]
        assert not bad, f"{len(bad)} of {len(samples)} samples unbalanced: {bad[:5]}"
        # The load was really there: most samples hold most of the clients' leases.
        busy = [s for s in samples if sum(s.values()) >= CLIENTS - 3]
        assert len(busy) >= len(samples) // 2, samples
        assert await in_flight(hosts, owned) == dict.fromkeys(owned, 0)


async def test_owner_declines_a_bounded_forward_unless_its_replica_has_fewer(
    tmp_path: Path, pg_dsn: str
) -> None:
    a = await start_host(tmp_path, pg_dsn, "a")
    try:
        replica = (await a.stub.Load(pb.LoadRequest(model="echo"), timeout=30)).replicas[0]
        held = [await a.stub.Route(pb.RouteRequest(model="echo"), timeout=10) for _ in range(2)]

        async def forwarded(bound: int, *, in_message: bool = False) -> pb.RouteResponse:
            marker = Marker(replica.id, replica.restarts, bound).encode()
            # As metadata (a unary forward), or in the message (a RouteStream's).
            md = () if in_message else (("modeld-forwarded", marker),)
            request = pb.RouteRequest(model="echo", forwarded=marker if in_message else "")
            reply: pb.RouteResponse = await a.stub.Route(request, metadata=md, timeout=10)
            return reply

        # The forwarder's own replica has 2 in flight too: not worth a hop, no lease.
        for in_message in (False, True):
            declined = await forwarded(2, in_message=in_message)
            assert declined.declined and not declined.lease_id
            assert declined.owner_in_flight == 2
        granted = await forwarded(3)
        assert not granted.declined and granted.lease_id.startswith("a~")
        assert granted.owner_in_flight == 3
        for lease in (*held, granted):
            reply = await a.stub.Release(pb.ReleaseRequest(lease_id=lease.lease_id), timeout=10)
            assert reply.released
    finally:
        await a.stop()
        await a.close()


async def test_the_channel_to_a_reaped_host_is_closed(tmp_path: Path, pg_dsn: str) -> None:
    async with running_cluster(tmp_path, pg_dsn, ["a", "b"]) as hosts:
        a, b = hosts["a"], hosts["b"]
        replica = (await b.stub.Load(pb.LoadRequest(model="echo"), timeout=30)).replicas[0]
        await a.wait_log(
            lambda e: (
                e.get("event") == "cluster_view_changed" and f"b/{replica.id}" in e.get("ready", [])
            ),
            20,
        )
        # A forwarded Route opens a's channel to b.
        lease = await a.stub.Route(pb.RouteRequest(model="echo"), timeout=10)
        assert lease.lease_id.startswith("b~")
        assert not [e for e in a.log if e.get("event") == "cluster_peer_closed"]
        b.proc.kill()
        await b.proc.wait()
        closed = await a.wait_log(lambda e: e.get("event") == "cluster_peer_closed", 30)
        assert (closed["host_id"], closed["address"]) == ("b", b.addr)
