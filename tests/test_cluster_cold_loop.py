"""The cluster's cold Route loop (cluster/front.py): a Route that finds no READY
replica anywhere starts one and looks again, at most COLD_ROUTES times, then
answers RetryRoute. The warm look and the start are held here, so each count is exact."""

from pathlib import Path

import pytest

from modeld import config
from modeld.cluster.front import COLD_ROUTES, ClusterRouter
from modeld.errors import RetryRoute
from modeld.info import Grant
from modeld.routing.lifecycle import ScaleUps
from modeld.spec import ModelSpec
from modeld.storage.catalog import Catalog
from routing_fakes import router_harness

ENV = {"MODELD_CLUSTER_DSN": "postgresql://db/x"}
GRANT = Grant("b~1", "r1", "127.0.0.1:1", "grpc", 0.0)


async def cold_route(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, warm_after: int | None
) -> tuple[Grant | Exception, list[str]]:
    """(the Route's grant or error, the starts it made) when its warm look finds a
    replica only after `warm_after` starts (None: never)."""
    spec = ModelSpec(name="m", backend="echo")
    async with router_harness(tmp_path, spec) as h:
        # The shared specs and the leader read it; neither runs here.
        catalog = Catalog(h.registry, {}, {}, {})
        front = ClusterRouter(
            config.load(None, env=ENV), h.router, h.clock, h.events,
            catalog=catalog, scale_ups=ScaleUps(),
        )  # fmt: skip
        starts: list[str] = []

        async def warm(model: str, deadline: float, key: str) -> Grant | None:
            return GRANT if warm_after is not None and len(starts) >= warm_after else None

        async def start(model: str, deadline: float) -> None:
            starts.append(model)

        monkeypatch.setattr(front, "_route_warm", warm)
        monkeypatch.setattr(front, "_start_here", start)
        try:
            answer: Grant | Exception = await front.route("m", h.clock.monotonic() + 30, "", ())
        except RetryRoute as exc:
            answer = exc
        await front.peers.close()
        return answer, starts


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
