"""What routing needs of a replica: the `Protocol` the real replica and test replicas meet.

`supervisor.replica.Replica` satisfies it; so does the test replica in
tests/routing_fakes.py, without a cast. In-flight slots are `supervisor.slots.Slots`
in both, so the bookkeeping tests exercise is the production one.
"""

from collections.abc import Callable
from typing import Protocol

from modeld.spec import BackendSpec, ModelSpec
from modeld.state import ReplicaState


class RoutedReplica(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def model(self) -> str: ...

    @property
    def spec(self) -> ModelSpec: ...

    @property
    def backend_name(self) -> str: ...

    @property
    def protocol(self) -> str: ...

    @property
    def node_id(self) -> str: ...

    @property
    def state(self) -> ReplicaState: ...

    @property
    def stop_requested(self) -> bool: ...

    @property
    def address(self) -> str: ...

    @property
    def pid(self) -> int | None: ...

    @property
    def gpu(self) -> str: ...

    @property
    def gpu_ids(self) -> tuple[int, ...]: ...

    @property
    def in_flight(self) -> int: ...

    @property
    def last_used(self) -> float: ...

    @property
    def idle_since(self) -> float | None: ...

    @property
    def started_at(self) -> float | None: ...

    @property
    def ready_at(self) -> float | None: ...

    @property
    def last_error(self) -> str: ...

    @property
    def restarts(self) -> int: ...

    def acquire(self, holder: str) -> bool: ...

    def release(self, holder: str) -> None: ...

    async def ensure_ready(self) -> None: ...

    async def stop(
        self,
        reason: str,
        *,
        force: bool = False,
        drain_timeout: float = 30.0,
        responsive: bool = True,
    ) -> None: ...

    @property
    def backend(self) -> BackendSpec: ...

    @property
    def probe_timeout(self) -> float: ...

    async def probe(self, limit_s: float) -> bool: ...

    async def refuses(self) -> bool: ...

    def kill(self) -> None: ...


# A replica tells its owner of every state change, synchronously, as it happens:
# crash handling, pruning and wake-ups never depend on the (lossy) event bus.
Listener = Callable[[RoutedReplica, ReplicaState, ReplicaState, str], None]


def routable(replica: RoutedReplica) -> bool:
    """May take a lease now: READY and not being stopped. The one definition."""
    return replica.state is ReplicaState.READY and not replica.stop_requested
