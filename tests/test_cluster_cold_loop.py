"""The cluster's cold Route loop (cluster/front.py): a Route that finds no READY
replica anywhere starts one and looks again, at most COLD_ROUTES times, then
answers RetryRoute; a start while the database link is down waits for the link a
moment first. The warm look, the start and the link are held here, so each count
and each order is exact."""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from modeld import config
from modeld.cluster.front import COLD_ROUTES, ClusterRouter
from modeld.errors import RetryRoute, Unavailable
from modeld.info import Grant, LinkState
from modeld.routing.lifecycle import ScaleUps
from modeld.spec import ModelSpec
from modeld.storage.catalog import Catalog
from routing_fakes import router_harness

ENV = {"MODELD_CLUSTER_DSN": "postgresql://db/x"}
GRANT = Grant("b~1", "r1", "127.0.0.1:1", "grpc", 0.0)


@contextlib.asynccontextmanager
async def cluster_front(tmp_path: Path) -> AsyncIterator[ClusterRouter]:
    """A cluster router over a test router; its database is never reached."""
    spec = ModelSpec(name="m", backend="echo")
    async with router_harness(tmp_path, spec) as h:
        # The shared specs and the leader read it; neither runs here.
        catalog = Catalog(h.registry, {}, {}, {})
        front = ClusterRouter(
            config.load(None, env=ENV), h.router, h.clock, h.events,
            catalog=catalog, scale_ups=ScaleUps(),
        )  # fmt: skip
        try:
            yield front
        finally:
            await front.peers.close()


async def cold_route(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, warm_after: int | None
) -> tuple[Grant | Exception, list[str]]:
    """(the Route's grant or error, the starts it made) when its warm look finds a
    replica only after `warm_after` starts (None: never)."""
    async with cluster_front(tmp_path) as front:
        starts: list[str] = []

        async def warm(model: str, deadline: float, key: str) -> Grant | None:
            return GRANT if warm_after is not None and len(starts) >= warm_after else None

        async def start(model: str, deadline: float) -> None:
            starts.append(model)

        monkeypatch.setattr(front, "_route_warm", warm)
        monkeypatch.setattr(front, "_start_here", start)
        try:
            answer: Grant | Exception = await front.route("m", _now(front) + 30, "", "")
        except RetryRoute as exc:
            answer = exc
        return answer, starts


def _now(front: ClusterRouter) -> float:
    return front._clock.monotonic()


async def test_a_warm_route_starts_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert await cold_route(tmp_path, monkeypatch, 0) == (GRANT, [])


async def test_a_route_served_after_a_start_says_cold_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert await cold_route(tmp_path, monkeypatch, 1) == (GRANT._replace(cold_start=True), ["m"])


async def test_a_replica_never_reachable_costs_cold_routes_starts_then_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    answer, starts = await cold_route(tmp_path, monkeypatch, None)
    assert starts == ["m"] * COLD_ROUTES
    assert isinstance(answer, RetryRoute) and "retry the Route" in str(answer)
    # The last start's replica is looked for once more before giving up.
    answer, starts = await cold_route(tmp_path, monkeypatch, COLD_ROUTES)
    assert answer == GRANT._replace(cold_start=True) and len(starts) == COLD_ROUTES


class HeldLink:
    """The database link, down until the test brings it back."""

    def __init__(self, up: bool = False) -> None:
        self.up = up
        self.waiting = asyncio.Event()
        self._back = asyncio.Event()

    async def wait_up(self) -> None:
        self.waiting.set()
        await self._back.wait()

    def come_back(self) -> None:
        self.up = True
        self._back.set()

    def state(self) -> LinkState:
        return LinkState(self.up, None if self.up else 0.0, "refused", "db:5432/x", 1)


async def start_with_link(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, link: HeldLink, wait_s: float, back: bool
) -> tuple[list[str], BaseException | None, bool]:
    """(the models started, what the start raised, whether it waited for the link) for a
    start with `wait_s` left before its deadline; with `back`, the link comes back once
    the start waits for it."""
    async with cluster_front(tmp_path) as front:
        ensured: list[str] = []

        async def ensure(model: str, deadline: float) -> None:
            ensured.append(model)

        monkeypatch.setattr(front.membership, "link", link)
        monkeypatch.setattr(front._cold, "ensure", ensure)
        start = asyncio.ensure_future(front._start_here("m", _now(front) + wait_s))
        if back:
            # Whichever comes first: the start waiting for the link, or its end.
            waiting = asyncio.ensure_future(link.waiting.wait())
            await asyncio.wait({start, waiting}, return_when=asyncio.FIRST_COMPLETED)
            waiting.cancel()
            assert not start.done() and ensured == []
            link.come_back()
        error = None
        try:
            await start
        except Unavailable as exc:
            error = exc
        return ensured, error, link.waiting.is_set()


async def test_a_start_with_the_link_up_waits_for_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert await start_with_link(tmp_path, monkeypatch, HeldLink(up=True), 30, False) == (
        ["m"], None, False
    )  # fmt: skip


async def test_a_start_waits_for_the_link_to_come_back_then_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert await start_with_link(tmp_path, monkeypatch, HeldLink(), 30, True) == (
        ["m"], None, True
    )  # fmt: skip


async def test_a_link_that_stays_down_fails_the_start_at_its_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 50 ms left: the wait ends at the Route's deadline, before LINK_WAIT_S.
    ensured, error, waited = await start_with_link(tmp_path, monkeypatch, HeldLink(), 0.05, False)
    assert ensured == [] and waited
    assert isinstance(error, Unavailable) and "needs the cluster database" in str(error)
