"""Backend-reported load: reads each `load_metrics` replica's Prometheus text, off the hot path.

One task per backend with `load_metrics` set: every `load_interval` it GETs
`metrics_path` of each of that backend's READY replicas at once, each with a
timeout (`scrape_timeout`), and keeps the latest `ReportedLoad` per replica id in
`reported`, which the router's pick reads without awaiting. A scrape that fails
(refused, hung, not 200, not Prometheus text, no such gauges) drops that replica's
report, so it is routed on its leases alone as without `load_metrics`; it never
marks the replica unhealthy (health is the prober's). A replica's failing is
logged once when it starts and once when it ends, not on every interval.
"""

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog

from modeld.policy.load import BadMetrics, ReportedLoad, read_load
from modeld.routing.routed import RoutedReplica
from modeld.spec import BackendSpec
from modeld.state import ReplicaState

if TYPE_CHECKING:
    import aiohttp

log = structlog.get_logger(__name__)

# A /metrics page larger than this is not read (vLLM's is some tens of kilobytes).
MAX_METRICS_BYTES = 4 << 20


def scrape_timeout(backend: BackendSpec) -> float:
    """How long one scrape may take: the interval, but at least 1 s and at most 10 s."""
    return min(max(backend.load_interval, 1.0), 10.0)


class LoadScraper:
    def __init__(
        self,
        backends: Callable[[], list[BackendSpec]],
        replicas: Callable[[], list[RoutedReplica]],
        on_failure: Callable[[str], None] = lambda _backend: None,
    ) -> None:
        self._backends = backends
        self._replicas = replicas
        self._on_failure = on_failure
        # backend -> replica id -> its latest report. Each round replaces its backend's
        # map whole, so a replica gone or failing has no report left; the router reads
        # it without awaiting, and only this class writes it.
        self.reported: dict[str, dict[str, ReportedLoad]] = {}
        # backend -> replicas whose last scrape failed (logged once when it began).
        self._failing: dict[str, set[str]] = {}

    def watched(self) -> list[BackendSpec]:
        return [b for b in self._backends() if b.protocol == "http" and b.load_metrics != "none"]

    async def run(self, backend: BackendSpec) -> None:
        import aiohttp  # only daemons with load_metrics backends need it

        timeout = aiohttp.ClientTimeout(total=scrape_timeout(backend))
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                await self.scrape_round(backend, session)
                await asyncio.sleep(backend.load_interval)

    async def scrape_round(self, backend: BackendSpec, session: "aiohttp.ClientSession") -> None:
        ready = [
            r
            for r in self._replicas()
            if r.backend_name == backend.name and r.state is ReplicaState.READY and r.address
        ]
        loads = await asyncio.gather(*(self._scrape(backend, session, r) for r in ready))
        self.reported[backend.name] = {
            r.id: load for r, load in zip(ready, loads, strict=True) if load is not None
        }
        failing = self._failing.setdefault(backend.name, set())
        failing &= {r.id for r in ready}

    async def _scrape(
        self, backend: BackendSpec, session: "aiohttp.ClientSession", replica: RoutedReplica
    ) -> ReportedLoad | None:
        import aiohttp  # imported by run() already

        url = f"http://{replica.address}{backend.metrics_path}"
        failing = self._failing.setdefault(backend.name, set())
        try:
            async with session.get(url) as response:
                if response.status != 200:
                    raise BadMetrics(f"HTTP {response.status}")
                body = bytearray()
                async for chunk in response.content.iter_chunked(1 << 16):
                    body += chunk
                    if len(body) > MAX_METRICS_BYTES:
                        raise BadMetrics(f"the page is over {MAX_METRICS_BYTES} bytes")
            load = read_load(backend.load_metrics, body.decode("utf-8", errors="replace"))
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            self._on_failure(backend.name)
            if replica.id not in failing:
                failing.add(replica.id)
                log.warning(
                    "load_scrape_failed",
                    replica_id=replica.id,
                    model=replica.model,
                    backend=backend.name,
                    url=url,
                    error=str(exc) or type(exc).__name__,
                    note="routed on its leases alone until a scrape succeeds; health is unaffected",
                )
            return None
        if replica.id in failing:
            failing.discard(replica.id)
            log.info("load_scrape_recovered", replica_id=replica.id, backend=backend.name)
        return load
