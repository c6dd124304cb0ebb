"""`modeld.v1.ModelControl`: validates requests, calls the owners, shapes replies."""

from collections.abc import AsyncIterator, Callable

import grpc

from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld._proto.modeld.v1 import modeld_pb2_grpc as pb_grpc
from modeld.api import convert
from modeld.api.leasing import DEFAULT_WAIT, LeaseCalls, forwarded_of
from modeld.api.pacing import Turnstile
from modeld.api.routestream import RouteStreams
from modeld.api.status import Ctx, bidi, deadline_of, stream, unary
from modeld.clock import Clock
from modeld.errors import FailedPrecondition, InvalidArgument, NotFound
from modeld.frontend import Frontend
from modeld.ops.events import CLUSTER, EventBus
from modeld.ops.logstore import LogStore
from modeld.ops.metrics import Metrics
from modeld.routing.router import Router
from modeld.spec import check_name
from modeld.storage.catalog import Catalog
from modeld.storage.settings_store import SettingsStore

# Without a client deadline, a Route or Load waits at most DEFAULT_WAIT for a start.
MAX_LOG_TAIL = 10_000
MAX_REPLICAS_PER_LOAD = 64
MAX_DRAIN_S = 86_400.0
# Messages all StreamLogs streams together, and all WatchEvents streams together, may
# send per event-loop turn, per second and in a burst (see api/pacing.py). One message
# costs the daemon 0.1-0.25 ms of gRPC work and thread hand-offs on a busy 2-core
# host; at 500/s streams take a tenth of a core, however many clients follow and
# whether or not they read. The burst lets a tail of the whole ring out at once.
STREAM_SENDS_PER_TURN = 4
STREAM_SENDS_PER_SECOND = 500
STREAM_SENDS_BURST = 1000
SERVICE = pb.DESCRIPTOR.services_by_name["ModelControl"]


def add_to_server(servicer: "ModelControl", server: grpc.aio.Server) -> None:
    """Register `servicer` like the generated helper does, but with lenient parsing:
    request bytes that do not parse reach the handler as `convert.Malformed`.

    Registered (not generic) handlers, as the generated helper does: gRPC matches the
    method itself instead of asking a Python handler per call."""
    handlers = {}
    for method in SERVICE.methods:
        request = getattr(pb, method.input_type.name)
        response = getattr(pb, method.output_type.name)
        make = (
            grpc.stream_stream_rpc_method_handler
            if method.client_streaming
            else grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=convert.lenient(request),
            response_serializer=response.SerializeToString,
        )
    # grpc-stubs predates add_registered_method_handlers (grpcio >= 1.63).
    server.add_registered_method_handlers(SERVICE.full_name, handlers)  # type: ignore[attr-defined]


class ModelControl(pb_grpc.ModelControlServicer):
    def __init__(
        self,
        *,
        clock: Clock,
        catalog: Catalog,
        router: Router,
        settings: SettingsStore,
        logs: LogStore,
        events: EventBus,
        metrics: Metrics,
        front: Frontend,
        on_settings: Callable[[], None] | None = None,
    ) -> None:
        self._clock = clock
        # Routing and what a cluster shares (leases, loads, specs, listings); `router`
        # is this host's own, for what is always local (unload, health, logs).
        self._front = front
        self._on_settings = on_settings
        self._catalog = catalog
        self._router = router
        self._settings = settings
        self._logs = logs
        self._events = events
        # Two turnstiles, so that a log flood never holds back `modeld load` progress.
        pacing = (STREAM_SENDS_PER_TURN, STREAM_SENDS_PER_SECOND, STREAM_SENDS_BURST)
        self._log_sends = Turnstile(*pacing)
        self._event_sends = Turnstile(*pacing)
        self._leases = LeaseCalls(clock=clock, catalog=catalog, front=front, metrics=metrics)
        self._streams = RouteStreams(self._leases)

    def close(self) -> None:
        """The daemon is stopping: every RouteStream ends with UNAVAILABLE."""
        self._streams.close()

    def _model(self, name: str) -> str:
        check_name("model", name)
        self._catalog.get(name)
        return name

    @unary
    async def Ping(self, request: pb.PingRequest, context: Ctx) -> pb.PingResponse:
        return pb.PingResponse()

    @unary
    async def Route(self, request: pb.RouteRequest, context: Ctx) -> pb.RouteResponse:
        return await self._leases.route(request, context)

    @unary
    async def Release(self, request: pb.ReleaseRequest, context: Ctx) -> pb.ReleaseResponse:
        return await self._leases.release(request, context)

    @unary
    async def RenewLease(
        self, request: pb.RenewLeaseRequest, context: Ctx
    ) -> pb.RenewLeaseResponse:
        return await self._leases.renew(request, context)

    @bidi
    async def RouteStream(
        self, requests: AsyncIterator[pb.RouteStreamRequest], context: Ctx
    ) -> None:
        await self._streams.serve(requests, context)

    @unary
    async def Load(self, request: pb.LoadRequest, context: Ctx) -> pb.LoadResponse:
        if not 0 <= request.replicas <= MAX_REPLICAS_PER_LOAD:
            raise InvalidArgument(f"replicas must be 0..{MAX_REPLICAS_PER_LOAD}")
        model = self._model(request.model)
        deadline = deadline_of(context, self._clock.monotonic(), DEFAULT_WAIT)
        infos = await self._front.load(
            model, request.replicas or 1, request.host, deadline, forwarded_of("", context)
        )
        return pb.LoadResponse(replicas=[convert.replica_to_proto(i) for i in infos])

    @unary
    async def Unload(self, request: pb.UnloadRequest, context: Ctx) -> pb.UnloadResponse:
        target = request.WhichOneof("target")
        if target is None:
            raise InvalidArgument("name a model or a replica_id to unload")
        drain = (
            convert.seconds("drain_timeout", request.drain_timeout, MAX_DRAIN_S)
            if request.HasField("drain_timeout")
            else None
        )
        if target == "model":
            check_name("model", request.model)
            infos = await self._router.unload_model(request.model, request.force, drain)
        else:
            infos = await self._router.unload_replica(request.replica_id, request.force, drain)
        return pb.UnloadResponse(stopped=[convert.replica_to_proto(i) for i in infos])

    @unary
    async def Health(self, request: pb.HealthRequest, context: Ctx) -> pb.HealthResponse:
        models = (
            [self._model(request.model)]
            if request.model
            else [s.name for s in self._catalog.list()]
        )
        report = await self._router.health(models, probe=request.probe)
        reply = pb.HealthResponse(
            models=[
                pb.ModelHealth(model=m, replicas=[convert.replica_to_proto(i) for i in infos])
                for m, infos in report.items()
            ]
        )
        link = self._front.link_state()
        if link is not None:
            reply.cluster_database.CopyFrom(convert.link_to_proto(link))
        return reply

    @unary
    async def PutModel(self, request: pb.PutModelRequest, context: Ctx) -> pb.ModelSpec:
        if not request.HasField("spec"):
            raise InvalidArgument("spec is required")
        spec = await self._front.put_model(convert.spec_from_proto(request.spec))
        return convert.spec_to_proto(spec)

    @unary
    async def DeleteModel(
        self, request: pb.DeleteModelRequest, context: Ctx
    ) -> pb.DeleteModelResponse:
        check_name("model", request.name)
        if self._router.has_live(request.name):
            raise FailedPrecondition(
                f"model {request.name!r} has running replicas; Unload it first"
            )
        deleted = await self._front.delete_model(request.name)
        return pb.DeleteModelResponse(deleted=deleted)

    @unary
    async def ListModels(
        self, request: pb.ListModelsRequest, context: Ctx
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[convert.spec_to_proto(s) for s in self._catalog.list()]
        )

    @unary
    async def ListBackends(
        self, request: pb.ListBackendsRequest, context: Ctx
    ) -> pb.ListBackendsResponse:
        backends = [self._catalog.backends[n] for n in sorted(self._catalog.backends)]
        return pb.ListBackendsResponse(backends=[convert.backend_to_proto(b) for b in backends])

    @unary
    async def ListReplicas(
        self, request: pb.ListReplicasRequest, context: Ctx
    ) -> pb.ListReplicasResponse:
        model = self._model(request.model) if request.model else None
        return convert.listing_to_proto(self._front.replicas(model, local=request.local))

    @unary
    async def ListHosts(self, request: pb.ListHostsRequest, context: Ctx) -> pb.ListHostsResponse:
        hosts = self._front.hosts()
        link = self._front.link_state()
        return pb.ListHostsResponse(
            hosts=[convert.host_to_proto(h) for h in hosts],
            database=convert.link_to_proto(link) if link is not None else None,
        )

    @unary
    async def GetSettings(self, request: pb.GetSettingsRequest, context: Ctx) -> pb.Settings:
        return convert.settings_to_proto(self._settings.current)

    @unary
    async def UpdateSettings(self, request: pb.UpdateSettingsRequest, context: Ctx) -> pb.Settings:
        changes = convert.settings_changes(request.settings)
        updated = await self._settings.update(changes)
        if self._on_settings is not None:
            self._on_settings()
        return convert.settings_to_proto(updated)

    @stream
    async def StreamLogs(
        self, request: pb.StreamLogsRequest, context: Ctx
    ) -> AsyncIterator[pb.LogLine]:
        if not 0 <= request.tail <= MAX_LOG_TAIL:
            raise InvalidArgument(f"tail must be 0..{MAX_LOG_TAIL}")
        model, replica_id = self._log_target(request)
        subscription = (
            self._logs.subscribe(model=model, replica_id=replica_id) if request.follow else None
        )
        try:
            for line in self._logs.tail(model=model, replica_id=replica_id, n=request.tail):
                await self._log_sends.turn()
                yield convert.log_line_to_proto(line)
            if subscription is not None:
                async for line in subscription:
                    await self._log_sends.turn()
                    yield convert.log_line_to_proto(line)
        finally:
            if subscription is not None:
                subscription.close()

    def _log_target(self, request: pb.StreamLogsRequest) -> tuple[str | None, str | None]:
        target = request.WhichOneof("target")
        if target == "model":
            model = self._model(request.model)
            return model, None
        if target == "replica_id":
            if not self._logs.knows_replica(request.replica_id):
                raise NotFound(
                    f"replica {request.replica_id[:64]!r} has no logs (unknown or long gone)"
                )
            return None, request.replica_id
        raise InvalidArgument("name a model or a replica_id")

    @stream
    async def WatchEvents(
        self, request: pb.WatchEventsRequest, context: Ctx
    ) -> AsyncIterator[pb.Event]:
        model = self._model(request.model) if request.model else None
        host_id = self._front.host_id
        subscription = self._events.subscribe(model)
        try:
            async for event in subscription:
                if event.kind == CLUSTER and not request.cluster:
                    continue
                await self._event_sends.turn()
                yield convert.event_to_proto(event, host_id)
        finally:
            subscription.close()
