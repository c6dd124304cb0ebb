"""What ListHosts, the cluster-wide ListReplicas and cluster events are made of.

Pure functions over the view: the caller passes `now` (monotonic, for lease
deadlines) or `wall` (for event times); nothing here reads a clock or does I/O.

A host's state, from its lease as this modeld last read it (`remaining` seconds):
- expired: remaining <= 0 — unless this modeld's own database link is down or
  freshly back (`trust_expired`), when every host looks expired and routing keeps
  trusting them: then such a host is only suspect;
- suspect: remaining < host_ttl/4. A host renews every host_ttl/3 and this view
  rereads every host_ttl/3, so a healthy host is seen with at least ~host_ttl/3
  left; under a quarter means a renewal is late (or the view is);
- alive otherwise.
"""

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from modeld.cluster.view import ClusterView, RemoteHost
from modeld.info import HostEntry, HostState, RemoteReplica
from modeld.ops.events import CLUSTER, Event
from modeld.state import LIVE, ReplicaState

SUSPECT_FRACTION = 0.25


@dataclass(frozen=True, slots=True)
class Here:
    """This modeld as it describes itself, for when the view does not show it yet."""

    host_id: str
    address: str
    role: str
    labels: Mapping[str, str]
    replicas: int  # live replicas, from this host's own router (fresher than the view)


def host_state(remaining: float | None, ttl: float, trust_expired: bool) -> HostState:
    if remaining is None:
        return HostState.SUSPECT
    if remaining <= 0:
        return HostState.SUSPECT if trust_expired else HostState.EXPIRED
    if remaining < ttl * SUSPECT_FRACTION:
        return HostState.SUSPECT
    return HostState.ALIVE


def list_hosts(
    view: ClusterView, now: float, ttl: float, *, trust_expired: bool, here: Here
) -> list[HostEntry]:
    """Every host of the view, plus this one when the view does not show it yet."""
    counts = Counter(r.host_id for r in view.replicas.values() if r.state in LIVE)
    counts[here.host_id] = here.replicas
    entries = [
        _entry(
            h, h.expires - now, ttl, trust_expired, replicas=counts[h.host_id], here=here.host_id
        )
        for h in view.hosts.values()
    ]
    if here.host_id not in view.hosts:
        entries.append(
            HostEntry(
                host_id=here.host_id,
                epoch=0,
                address=here.address,
                role=here.role,
                labels=dict(here.labels),
                state=host_state(None, ttl, trust_expired),
                replicas=here.replicas,
                gpu_free=(),
                gpu_total=(),
                ram_free=0,
                ram_total=0,
                lease_remaining=None,
                heartbeat_age=None,
                local=True,
            )
        )
    return sorted(entries, key=lambda e: e.host_id)


def _entry(
    host: RemoteHost, remaining: float, ttl: float, trust_expired: bool, *, replicas: int, here: str
) -> HostEntry:
    return HostEntry(
        host_id=host.host_id,
        epoch=host.epoch,
        address=host.address,
        role=host.role,
        labels=dict(host.labels),
        state=HostState.EXPIRED if host.gone else host_state(remaining, ttl, trust_expired),
        replicas=replicas,
        gpu_free=host.figures.gpu_free,
        gpu_total=host.figures.gpu_total,
        ram_free=host.figures.ram_free,
        ram_total=host.figures.ram_total,
        lease_remaining=remaining,
        # A renewal sets the lease to host_ttl; the database keeps no renewal time, so
        # the age assumes the host runs this host's host_ttl.
        heartbeat_age=max(ttl - remaining, 0.0),
        local=host.host_id == here,
    )


def host_replica_counts(view: ClusterView) -> dict[str, dict[str, int]]:
    """Host → published state → replicas, every host of the view (zero when it has none)."""
    counts: dict[str, dict[str, int]] = {h: {} for h in view.hosts}
    for r in view.replicas.values():
        per_host = counts.setdefault(r.host_id, {})
        per_host[r.state.value] = per_host.get(r.state.value, 0) + 1
    return counts


def host_state_counts(entries: list[HostEntry]) -> dict[str, int]:
    counts = {state.value: 0 for state in HostState}
    for entry in entries:
        counts[entry.state.value] += 1
    return counts


def view_events(
    before: Mapping[str, RemoteReplica],
    after: Mapping[str, RemoteReplica],
    hosts_after: Mapping[str, RemoteHost],
    here: str,
    wall: float,
) -> list[Event]:
    """Other hosts' replicas that appeared, changed state or generation, or went away.

    A host publishes only live replicas, so one that went away stopped or failed
    there (or its host left): that is reported as a change to STOPPED.
    """
    events = []
    for rid in sorted(before.keys() | after.keys()):
        old, new = before.get(rid), after.get(rid)
        if new is not None and new.host_id != here:
            if old is None:
                reason = f"seen on host {new.host_id}"
                events.append(_event(wall, new, None, new.state, reason))
            elif old.state is not new.state or old.generation != new.generation:
                reason = "restarted" if old.generation != new.generation else ""
                events.append(_event(wall, new, old.state, new.state, reason))
        elif new is None and old is not None and old.host_id != here:
            reason = (
                f"gone from host {old.host_id}"
                if old.host_id in hosts_after
                else f"host {old.host_id} left the cluster"
            )
            events.append(_event(wall, old, old.state, ReplicaState.STOPPED, reason))
    return events


def _event(
    wall: float,
    replica: RemoteReplica,
    from_state: ReplicaState | None,
    to_state: ReplicaState,
    reason: str,
) -> Event:
    return Event(
        wall, replica.id, replica.model, from_state, to_state, reason, CLUSTER, replica.host_id
    )
