"""Replica counts across the cluster: every start takes one of the model's
max_replicas slots, scale-up included, and a host back from an expired lease
re-takes its replicas' slots (or stops the ones beyond max_replicas).

Real daemons and real PostgreSQL; the counts are read from `modeld_replicas`.
"""

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import grpc
import pytest

from cluster_proc import HOST_TTL, after, db_rows, event, load_on, running_cluster
from daemon_proc import DaemonProc
from modeld._proto.modeld.v1 import modeld_pb2 as pb

pytestmark = pytest.mark.timeout(150)


def catalog(max_replicas: int, parallel: int = 0) -> str:
    """With `parallel`, queue_max = 0: a Route that finds every replica full asks for one
    more and is refused at once (RESOURCE_EXHAUSTED) instead of waiting."""
    return (
        '[backends.echo]\ncommand = ["{python}", "-m", "modeld.backends.echo", '
        '"--addr", "{addr}"]\nstop_grace = "2s"\n'
        f'[models.echo]\nbackend = "echo"\nmax_replicas = {max_replicas}\n'
        f"parallel = {parallel}\nqueue_max = 0\n"
    )


async def hosts_of(dsn: str) -> list[str]:
    rows = await db_rows(
        dsn,
        "SELECT r.host_id FROM modeld_replicas r JOIN modeld_hosts h "
        "ON h.host_id = r.host_id AND h.epoch = r.epoch WHERE r.model = 'echo' "
        "ORDER BY r.host_id",
    )
    return [r["host_id"] for r in rows]


@contextlib.asynccontextmanager
async def sampling(dsn: str) -> AsyncIterator[list[int]]:
    """The most replicas of `echo` seen in the database at any sample, while the block runs."""
    most = [0]
    stop = asyncio.Event()

    async def watch() -> None:
        while not stop.is_set():
            most[0] = max(most[0], len(await hosts_of(dsn)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.05)  # the sampling period
        most[0] = max(most[0], len(await hosts_of(dsn)))  # and once as the block ends

    task = asyncio.ensure_future(watch())
    try:
        yield most
    finally:
        stop.set()
        await task


async def until_hosts(dsn: str, ok: object, what: str, limit_s: float = 40) -> list[str]:
    loop = asyncio.get_running_loop()
    end = loop.time() + limit_s
    while True:
        hosts = await hosts_of(dsn)
        if callable(ok) and ok(hosts):
            return hosts
        assert loop.time() < end, f"timed out waiting for {what}: {hosts}"
        await asyncio.sleep(0.1)


async def until_logged(daemons: list[DaemonProc], match: object, limit_s: float) -> None:
    """Until any of `daemons` logged a line `match` accepts."""
    waits = [asyncio.ensure_future(x.wait_log(match, limit_s)) for x in daemons]  # type: ignore[arg-type]
    try:
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        done.pop().result()
    finally:
        for w in waits:
            w.cancel()
        await asyncio.gather(*waits, return_exceptions=True)


async def route(daemon: DaemonProc) -> pb.RouteResponse | None:
    """A lease, or None when every replica was full (the scale-out it asked for may come)."""
    try:
        reply: pb.RouteResponse = await daemon.stub.Route(pb.RouteRequest(model="echo"), timeout=30)
    except grpc.aio.AioRpcError as exc:
        if exc.code() is not grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise
        return None
    return reply


def cluster(
    tmp_path: Path, dsn: str, hosts: Mapping[str, str], cat: str
) -> contextlib.AbstractAsyncContextManager[dict[str, DaemonProc]]:
    return running_cluster(tmp_path, dsn, list(hosts), extra=hosts, catalog=cat)


async def test_scale_up_under_load_never_exceeds_max_replicas(tmp_path: Path, pg_dsn: str) -> None:
    hosts = dict.fromkeys(("a", "b", "c"), "")
    async with cluster(tmp_path, pg_dsn, hosts, catalog(2, parallel=1)) as d:
        await load_on(d["a"], "a")
        await load_on(d["a"], "b")
        async with sampling(pg_dsn) as most:
            # Leases held (never released): every Route after the first finds every
            # replica full and asks for a scale-out, on every host.
            for _ in range(4):
                await asyncio.gather(*(route(x) for x in d.values()))
            skipped = event("cluster_scale_up_skipped")
            try:
                await until_logged(list(d.values()), skipped, 30)
            except TimeoutError:
                raise AssertionError(
                    f"no scale-up was refused; replicas on {await hosts_of(pg_dsn)}, "
                    f"at most {most[0]}"
                ) from None
            assert len(await hosts_of(pg_dsn)) == 2
        assert most[0] == 2
        assert not any(event("scale_out")(e) for x in d.values() for e in x.log)


async def test_scale_ups_from_every_host_start_one_replica(tmp_path: Path, pg_dsn: str) -> None:
    hosts = dict.fromkeys(("a", "b", "c"), "")
    async with cluster(tmp_path, pg_dsn, hosts, catalog(2, parallel=1)) as d:
        await load_on(d["a"], "a")
        await until_hosts(pg_dsn, lambda h: h == ["a"], "a's replica in the database")
        async with sampling(pg_dsn) as most:
            for _ in range(6):
                await asyncio.gather(*(route(x) for x in d.values()))
            await until_hosts(pg_dsn, lambda h: len(h) == 2, "the scale-up")
            # Busy again: the next scale-ups, if any asks, find every slot held.
            for _ in range(6):
                await asyncio.gather(*(route(x) for x in d.values()))
        assert most[0] == 2
        assert len(await hosts_of(pg_dsn)) == 2
        scaled = event("cluster_scale_up")
        assert sum(1 for x in d.values() for e in x.log if scaled(e)) == 1


async def test_scale_up_lands_on_another_host(tmp_path: Path, pg_dsn: str) -> None:
    # a cannot admit a second replica (max_loaded = 1, its one replica busy).
    hosts = {"a": "", "b": ""}
    cat = "[watchdog]\nmax_loaded = 1\n" + catalog(2, parallel=1)
    async with cluster(tmp_path, pg_dsn, hosts, cat) as d:
        await load_on(d["a"], "a")
        await until_hosts(pg_dsn, lambda h: h == ["a"], "a's replica in the database")
        async with sampling(pg_dsn) as most:
            await route(d["a"])
            await route(d["a"])
            placed = await until_hosts(pg_dsn, lambda h: len(h) == 2, "the scale-up")
        assert placed == ["a", "b"]
        assert most[0] == 2


@pytest.mark.long
async def test_host_back_after_lease_expiry_keeps_max_replicas(tmp_path: Path, pg_dsn: str) -> None:
    hosts = {"a": "", "b": ""}
    async with cluster(tmp_path, pg_dsn, hosts, catalog(1)) as d:
        a, b = d["a"], d["b"]
        await load_on(a, "a")
        stopped = after(a, event("cluster_slot_lost_stopped"))
        a.proc.send_signal(signal.SIGSTOP)
        try:
            # a's slot is free once its lease expired: b takes it.
            loop = asyncio.get_running_loop()
            end = loop.time() + 10 * HOST_TTL + 20
            while True:
                try:
                    await load_on(b, "b")
                    break
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() is grpc.StatusCode.FAILED_PRECONDITION, exc
                    assert loop.time() < end, exc
        finally:
            a.proc.send_signal(signal.SIGCONT)
        # Back (under its old epoch or a new one), a announced its replica again:
        # it must give it up, its slot being b's.
        await a.wait_log(stopped, 40)
        await until_hosts(pg_dsn, lambda h: h == ["b"], "a's replica beyond max_replicas gone")
