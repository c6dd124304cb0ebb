"""Protobuf <-> domain translation. No behaviour beyond shaping data."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import DecodeError, Message
from google.protobuf.timestamp_pb2 import Timestamp

from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld.errors import InvalidArgument
from modeld.info import Grant, HostEntry, LinkState, Listing, QueueInfo, ReplicaInfo
from modeld.ops.events import Event
from modeld.ops.logstore import LogLine
from modeld.spec import DEFAULT_QUEUE_MAX, BackendSpec, ModelSpec, Settings
from modeld.state import ReplicaState

_MAX_SECONDS = 10 * 365 * 86400
_MAX_NANOS = 999_999_999


@dataclass(frozen=True)
class Malformed:
    """Request bytes that do not parse as the method's message; answered INVALID_ARGUMENT.

    gRPC would report a deserializer's exception as UNKNOWN, so parsing never raises:
    the handler receives this instead and refuses it like any other bad request.
    """

    type_name: str
    error: str


def lenient(cls: type[Message]) -> Callable[[bytes], Message | Malformed]:
    """A request deserializer for `cls` that returns Malformed instead of raising."""

    def parse(data: bytes) -> Message | Malformed:
        try:
            return cls.FromString(data)
        except DecodeError as exc:
            return Malformed(cls.DESCRIPTOR.full_name, str(exc))

    return parse


def link_to_proto(state: LinkState) -> pb.DatabaseLink:
    return pb.DatabaseLink(
        up=state.up,
        down_since=timestamp(state.down_since),
        error=state.error,
        where=state.where,
        attempts=state.attempts,
    )


def timestamp(wall: float | None) -> Timestamp | None:
    if wall is None:
        return None
    # What FromNanoseconds computes, without its pure-Python checks (a Route's share).
    seconds, nanos = divmod(int(wall * 1e9), 1_000_000_000)
    return Timestamp(seconds=seconds, nanos=nanos)


def duration(seconds: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def seconds(field: str, d: Duration, limit: float = _MAX_SECONDS) -> float:
    """A non-negative Duration as seconds, at most `limit`; anything else is refused."""
    if not 0 <= d.nanos <= _MAX_NANOS or d.seconds < 0:
        raise InvalidArgument(f"{field} must be a non-negative duration (nanos 0..{_MAX_NANOS})")
    value = d.seconds + d.nanos / 1e9
    if value > limit:
        raise InvalidArgument(f"{field} must be at most {limit:g} seconds")
    return value


def state(s: ReplicaState | None) -> Any:
    return pb.ReplicaState.Value(s.value) if s else pb.REPLICA_STATE_UNSPECIFIED


def protocol(name: str) -> Any:
    return pb.HTTP if name == "http" else pb.GRPC


def route_response(grant: Grant) -> pb.RouteResponse:
    return pb.RouteResponse(
        lease_id=grant.lease_id,
        replica_id=grant.replica_id,
        address=grant.address,
        protocol=protocol(grant.protocol),
        lease_expires_at=timestamp(grant.expires_wall),
        cold_start=grant.cold_start,
        owner_address=grant.owner_address,
        owner_in_flight=grant.owner_in_flight,
        declined=grant.declined,
    )


def listing_to_proto(listing: Listing) -> pb.ListReplicasResponse:
    """This host's replicas and then the others', grouped by host (a stable sort:
    each host's in the order they came)."""
    listed = [replica_to_proto(i) for i in listing.replicas]
    listed.sort(key=lambda r: r.host_id)
    return pb.ListReplicasResponse(
        replicas=listed,
        queues=[queue_to_proto(q) for q in listing.queues],
    )


def spec_from_proto(msg: pb.ModelSpec) -> ModelSpec:
    def opt(name: str) -> float | None:
        return seconds(name, getattr(msg, name)) if msg.HasField(name) else None

    return ModelSpec(
        name=msg.name,
        backend=msg.backend,
        model_file=msg.model_file,
        options=tuple(sorted(msg.options.items())),
        min_replicas=msg.min_replicas,
        max_replicas=msg.max_replicas or max(1, msg.min_replicas),
        pinned=msg.pinned,
        groups=tuple(msg.groups),
        idle_ttl=opt("idle_ttl"),
        lease_ttl=opt("lease_ttl"),
        busy_timeout=opt("busy_timeout"),
        memory_estimate=msg.memory_estimate,
        gpus=msg.gpus if msg.HasField("gpus") else None,
        gpu_ids=tuple(msg.gpu_ids),
        source="api",
        host_labels=tuple(sorted(msg.host_labels.items())),
        placement=msg.placement,
        parallel=msg.parallel,
        queue_max=msg.queue_max if msg.HasField("queue_max") else DEFAULT_QUEUE_MAX,
    )


def spec_to_proto(spec: ModelSpec) -> pb.ModelSpec:
    msg = pb.ModelSpec(
        name=spec.name,
        backend=spec.backend,
        model_file=spec.model_file,
        options=dict(spec.options),
        min_replicas=spec.min_replicas,
        max_replicas=spec.max_replicas,
        pinned=spec.pinned,
        groups=list(spec.groups),
        memory_estimate=spec.memory_estimate,
        gpu_ids=list(spec.gpu_ids),
        source=spec.source,
        host_labels=dict(spec.host_labels),
        placement=spec.placement,
        parallel=spec.parallel,
        queue_max=spec.queue_max,
    )
    for name in ("idle_ttl", "lease_ttl", "busy_timeout"):
        value = getattr(spec, name)
        if value is not None:
            getattr(msg, name).CopyFrom(duration(value))
    if spec.gpus is not None:
        msg.gpus = spec.gpus
    return msg


def backend_to_proto(backend: BackendSpec) -> pb.Backend:
    return pb.Backend(
        name=backend.name, protocol=protocol(backend.protocol), aliases=backend.aliases
    )


def queue_to_proto(info: QueueInfo) -> pb.ModelQueue:
    return pb.ModelQueue(
        model=info.model,
        length=info.length,
        parallel=info.parallel,
        queue_max=info.queue_max,
        oldest_wait=duration(info.oldest_wait),
    )


def replica_to_proto(info: ReplicaInfo) -> pb.Replica:
    return pb.Replica(
        id=info.id,
        model=info.model,
        backend=info.backend,
        state=state(info.state),
        address=info.address,
        pid=info.pid or 0,
        in_flight=info.in_flight,
        last_used=timestamp(info.last_used),
        started_at=timestamp(info.started_at),
        ready_at=timestamp(info.ready_at),
        gpu=info.gpu,
        last_error=info.last_error,
        restarts=info.restarts,
        memory=info.memory,
        last_probe_ok=info.last_probe_ok,
        last_probe_at=timestamp(info.last_probe_at),
        node_id=info.node_id,
        suspect=info.suspect,
        host_id=info.host_id,
        live_leases=info.live_leases,
        load_reported=info.load_waiting is not None,
        load_waiting=info.load_waiting or 0,
        load_running=info.load_running,
        kv_cache_usage=info.kv_cache_usage if info.kv_cache_usage is not None else -1.0,
    )


def host_to_proto(host: HostEntry) -> pb.Host:
    msg = pb.Host(
        host_id=host.host_id,
        address=host.address,
        role=host.role,
        state=f"HOST_{host.state.name}",
        labels=dict(host.labels),
        gpu_free=list(host.gpu_free),
        gpu_total=list(host.gpu_total),
        ram_free=host.ram_free,
        ram_total=host.ram_total,
        replicas=host.replicas,
        epoch=host.epoch,
        local=host.local,
    )
    if host.heartbeat_age is not None:
        msg.heartbeat_age.CopyFrom(duration(host.heartbeat_age))
    if host.lease_remaining is not None:
        msg.lease_remaining.CopyFrom(duration(host.lease_remaining))
    return msg


def settings_to_proto(s: Settings) -> pb.Settings:
    return pb.Settings(
        busy_timeout=duration(s.busy_timeout),
        idle_timeout=duration(s.idle_timeout),
        max_loaded=s.max_loaded,
        memory_threshold=s.memory_threshold,
        force_eviction_when_busy=s.force_eviction_when_busy,
        watchdog_interval=duration(s.watchdog_interval),
    )


def settings_changes(msg: pb.Settings) -> dict[str, Any]:
    """Only the fields the client set."""
    changes: dict[str, Any] = {}
    for name in ("busy_timeout", "idle_timeout", "watchdog_interval"):
        if msg.HasField(name):
            changes[name] = seconds(name, getattr(msg, name))
    for name in ("max_loaded", "memory_threshold", "force_eviction_when_busy"):
        if msg.HasField(name):
            changes[name] = getattr(msg, name)
    return changes


def event_to_proto(event: Event, host_id: str = "") -> pb.Event:
    """`host_id`: this host's, in cluster mode, for events of its own replicas."""
    return pb.Event(
        time=timestamp(event.time),
        replica_id=event.replica_id,
        model=event.model,
        from_state=state(event.from_state),
        to_state=state(event.to_state),
        reason=event.reason,
        health=event.health,
        host_id=event.host_id or host_id,
    )


def log_line_to_proto(line: LogLine) -> pb.LogLine:
    return pb.LogLine(
        time=timestamp(line.time),
        replica_id=line.replica_id,
        stream=line.stream,
        text=line.text,
        model=line.model,
    )
