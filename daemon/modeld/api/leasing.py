"""Route, Release and RenewLease: one implementation for the unary calls and RouteStream.

Each call has a synchronous `*_now` form that answers in the same loop turn when the
frontend can (modeld.frontend) and returns None when the call must wait; the
awaitable form is `*_now` or else the waiting path. RouteStream answers the
synchronous ones inline and runs only the others as tasks.
"""

from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld.api import convert
from modeld.api.status import Ctx, deadline_of, status_of
from modeld.clock import Clock
from modeld.errors import InvalidArgument, ModeldError
from modeld.frontend import Frontend
from modeld.info import FORWARDED
from modeld.ops.metrics import Metrics
from modeld.spec import check_name
from modeld.storage.catalog import Catalog

# Without a client deadline, a Route waits at most this long for a start.
DEFAULT_WAIT = 600.0
# An affinity key is hashed on every keyed Route: a bounded one keeps that cheap.
MAX_AFFINITY_KEY = 256
# ReleaseOutcome number → name, and the two Release answers, built once.
OUTCOMES = {n: pb.ReleaseOutcome.Name(n) for n in pb.ReleaseOutcome.values()}
RELEASED = pb.ReleaseResponse(released=True)
NOT_RELEASED = pb.ReleaseResponse(released=False)


def forwarded_of(field: str, context: Ctx) -> str:
    """The marker of a call another modeld forwarded ("" for any other): the request's
    `forwarded` field (over a RouteStream, where a message has no metadata), else the
    call's `modeld-forwarded` metadata, so that both are read alike."""
    if field:
        return field
    for key, value in context.invocation_metadata() or ():
        if key == FORWARDED:
            return value if isinstance(value, str) else value.decode()
    return ""


def _affinity_key(request: pb.RouteRequest) -> str:
    key = request.affinity_key
    if len(key) > MAX_AFFINITY_KEY:
        raise InvalidArgument(
            f"affinity_key is {len(key)} characters; the limit is {MAX_AFFINITY_KEY} "
            "(send a hash of a long prefix instead)"
        )
    return key


class LeaseCalls:
    def __init__(
        self, *, clock: Clock, catalog: Catalog, front: Frontend, metrics: Metrics
    ) -> None:
        self._clock = clock
        self._catalog = catalog
        self._front = front
        self._metrics = metrics

    def _model(self, name: str) -> str:
        # A defined model's name was checked when it was defined: the warm path skips
        # the pattern match, anything else gets the precise refusal.
        if not self._catalog.knows(name):
            check_name("model", name)
            self._catalog.get(name)
        return name

    def route_now(self, request: pb.RouteRequest) -> pb.RouteResponse | None:
        key = _affinity_key(request)
        model = self._model(request.model)
        started = self._clock.monotonic()
        try:
            grant = self._front.route_now(model, key, request.forwarded)
        except ModeldError as exc:
            self._counted(model, started, exc)
            raise
        if grant is None:
            return None
        self._metrics.route(model, "ok", self._clock.monotonic() - started)
        return convert.route_response(grant)

    async def route(self, request: pb.RouteRequest, context: Ctx) -> pb.RouteResponse:
        reply = self.route_now(request)
        if reply is not None:
            return reply
        model = self._model(request.model)
        started = self._clock.monotonic()
        deadline = deadline_of(context, started, DEFAULT_WAIT)
        try:
            grant = await self._front.route(
                model, deadline, request.affinity_key, forwarded_of(request.forwarded, context)
            )
        except ModeldError as exc:
            self._counted(model, started, exc)
            raise
        self._metrics.route(model, "ok", self._clock.monotonic() - started)
        if grant.cold_start:
            self._metrics.cold_start(model)
        return convert.route_response(grant)

    def _counted(self, model: str, started: float, exc: ModeldError) -> None:
        self._metrics.route(model, status_of(exc).name.lower(), self._clock.monotonic() - started)

    def _outcome(self, request: pb.ReleaseRequest) -> str:
        if not request.lease_id:
            raise InvalidArgument("lease_id is empty")
        outcome = OUTCOMES.get(request.outcome)
        if outcome is None:
            raise InvalidArgument(f"outcome {request.outcome} is not a known ReleaseOutcome")
        return outcome

    def release_now(self, request: pb.ReleaseRequest) -> pb.ReleaseResponse | None:
        released = self._front.release_now(request.lease_id, self._outcome(request))
        if released is None:
            return None
        return RELEASED if released else NOT_RELEASED

    async def release(self, request: pb.ReleaseRequest, context: Ctx) -> pb.ReleaseResponse:
        reply = self.release_now(request)
        if reply is not None:
            return reply
        released = await self._front.release(
            request.lease_id, OUTCOMES[request.outcome], forwarded_of(request.forwarded, context)
        )
        return RELEASED if released else NOT_RELEASED

    def renew_now(self, request: pb.RenewLeaseRequest) -> pb.RenewLeaseResponse | None:
        if not request.lease_id:
            raise InvalidArgument("lease_id is empty")
        expires = self._front.renew_now(request.lease_id)
        if expires is None:
            return None
        return pb.RenewLeaseResponse(lease_expires_at=convert.timestamp(expires))

    async def renew(self, request: pb.RenewLeaseRequest, context: Ctx) -> pb.RenewLeaseResponse:
        reply = self.renew_now(request)
        if reply is not None:
            return reply
        expires = await self._front.renew(
            request.lease_id, forwarded_of(request.forwarded, context)
        )
        return pb.RenewLeaseResponse(lease_expires_at=convert.timestamp(expires))
