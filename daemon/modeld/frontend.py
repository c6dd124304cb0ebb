"""The one routing interface the API calls, for one host and for many.

The servicer converts protobuf to these calls and their answers back, and never
asks which implementation it holds: `LocalFrontend` here (one host: the router and
the catalog), or the cluster's `ClusterRouter` (modeld.cluster.front), which
composes the same router. The daemon picks one at start (`Daemon._build_frontend`).

Each call that can answer in the same loop turn has a `*_now` form returning None
when it must wait instead (a cold start; in a cluster, anything that may forward or
reach the database), so that RouteStream answers the warm ones inline.

`forwarded` is the marker of a call another modeld forwarded ("" for any other
call), as the API read it from the request or its metadata: a cluster reads it; one
host ignores it.
"""

from typing import Protocol

from modeld.errors import FailedPrecondition
from modeld.info import Grant, HostEntry, LinkState, Listing, ReplicaInfo
from modeld.routing.router import Router
from modeld.spec import ModelSpec
from modeld.storage.catalog import Catalog


class Frontend(Protocol):
    @property
    def host_id(self) -> str:
        """This host's id in a cluster, "" alone."""
        ...

    def route_now(self, model: str, key: str, forwarded: str) -> Grant | None: ...

    async def route(self, model: str, deadline: float, key: str, forwarded: str) -> Grant: ...

    def release_now(self, lease_id: str, outcome: str) -> bool | None: ...

    async def release(self, lease_id: str, outcome: str, forwarded: str) -> bool: ...

    def renew_now(self, lease_id: str) -> float | None:
        """The lease's new expiry (wall clock), or None: await `renew`."""
        ...

    async def renew(self, lease_id: str, forwarded: str) -> float: ...

    async def load(
        self, model: str, replicas: int, host: str, deadline: float, forwarded: str
    ) -> list[ReplicaInfo]: ...

    async def put_model(self, spec: ModelSpec) -> ModelSpec: ...

    async def delete_model(self, name: str) -> bool:
        """Delete a spec whose model has no live replica on this host (the caller
        checked); True when there was one."""
        ...

    def replicas(self, model: str | None, *, local: bool) -> Listing: ...

    def hosts(self) -> list[HostEntry]: ...

    def link_state(self) -> LinkState | None:
        """The cluster database link; None alone."""
        ...


class LocalFrontend:
    """One host: every answer comes from this host's router and catalog."""

    def __init__(self, router: Router, catalog: Catalog) -> None:
        self._router = router
        self._catalog = catalog

    @property
    def host_id(self) -> str:
        return ""

    def route_now(self, model: str, key: str, forwarded: str) -> Grant | None:
        lease = self._router.route_now(model, key)
        return None if lease is None else lease.grant()

    async def route(self, model: str, deadline: float, key: str, forwarded: str) -> Grant:
        return (await self._router.route(model, deadline, key)).grant()

    def release_now(self, lease_id: str, outcome: str) -> bool:
        return self._router.release(lease_id, outcome)

    async def release(self, lease_id: str, outcome: str, forwarded: str) -> bool:
        return self._router.release(lease_id, outcome)

    def renew_now(self, lease_id: str) -> float:
        return self._router.renew(lease_id)

    async def renew(self, lease_id: str, forwarded: str) -> float:
        return self._router.renew(lease_id)

    async def load(
        self, model: str, replicas: int, host: str, deadline: float, forwarded: str
    ) -> list[ReplicaInfo]:
        if host:
            raise FailedPrecondition("Load.host names a cluster host, but [cluster] is not set")
        return await self._router.load(model, replicas, deadline)

    async def put_model(self, spec: ModelSpec) -> ModelSpec:
        return await self._catalog.put(spec)

    async def delete_model(self, name: str) -> bool:
        return await self._catalog.delete(name)

    def replicas(self, model: str | None, *, local: bool) -> Listing:
        return Listing(self._router.replicas(model), self._router.queues.infos(model))

    def hosts(self) -> list[HostEntry]:
        raise FailedPrecondition(
            "ListHosts lists the hosts of a cluster, and this modeld runs alone "
            "([cluster] is not set); ListReplicas (`modeld ps`) lists its replicas"
        )

    def link_state(self) -> None:
        return None
