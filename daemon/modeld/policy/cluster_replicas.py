"""Which models need more replicas cluster-wide to reach `min_replicas`, and where (pure).

The leader (cluster/leader.py) feeds it the specs it knows, the replicas counted
in the cluster view and what the hosts can take; it answers with Loads to send.
No I/O, no clock, no logging.

A Load names the number of replicas wanted *on its host* (`Load{model, replicas,
host}` is idempotent per host: a repeat starts nothing more), so each start is
the host's current count plus what this round places there. Placement is
`policy.host_placement.place`, asked once per missing replica with the counts
updated, so that spreading sees the replicas this round already placed.
"""

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from modeld.errors import FailedPrecondition
from modeld.policy.host_placement import HostCapacity, place, placement_mode
from modeld.spec import ModelSpec
from modeld.state import STARTING_STATES, ReplicaState

# Replicas that count towards min_replicas: starting or ready. DRAINING and STOPPING
# ones are on their way out, and a replacement should already be on its way.
COUNTED = STARTING_STATES | {ReplicaState.READY}


@dataclass(frozen=True, slots=True)
class Counted:
    """One replica as the leader counts it."""

    model: str
    host_id: str
    state: ReplicaState


@dataclass(frozen=True, slots=True)
class Start:
    """Send `Load{model, replicas, host}`: `replicas` is the total wanted on that host."""

    model: str
    host_id: str
    replicas: int


@dataclass(frozen=True)
class Plan:
    starts: tuple[Start, ...]
    # model -> why no host could take a missing replica (FailedPrecondition's message).
    unplaceable: Mapping[str, str]


def counts(replicas: Iterable[Counted]) -> dict[str, dict[str, int]]:
    """model -> host -> replicas that count towards min_replicas."""
    out: dict[str, dict[str, int]] = {}
    for r in replicas:
        if r.state in COUNTED:
            per_host = out.setdefault(r.model, {})
            per_host[r.host_id] = per_host.get(r.host_id, 0) + 1
    return out


def plan(
    specs: Iterable[ModelSpec],
    replicas: Iterable[Counted],
    hosts: Sequence[HostCapacity],
    *,
    busy: Collection[str] = (),
    refused: Mapping[str, Collection[str]] | None = None,
    default_mode: str = "spread",
) -> Plan:
    """Starts that bring each model in `specs` up to its min_replicas across `hosts`.

    `busy`: models with a Load of the leader's still in flight (planned next round).
    `refused`: model -> hosts that recently refused or failed a Load of it.
    `default_mode`: the cluster's placement, for specs that do not name their own.
    """
    counted = counts(replicas)
    refused = refused or {}
    starts: list[Start] = []
    unplaceable: dict[str, str] = {}
    for spec in sorted(specs, key=lambda s: s.name):
        have = counted.get(spec.name, {})
        missing = spec.min_replicas - sum(have.values())
        if missing <= 0 or spec.name in busy:
            continue
        skip = set(refused.get(spec.name, ()))
        candidates = [
            replace(h, model_replicas={**h.model_replicas, spec.name: have.get(h.host_id, 0)})
            for h in hosts
            if h.host_id not in skip
        ]
        mode = placement_mode(spec, default_mode)
        wanted, why = _place_missing(spec, candidates, missing, mode)
        starts += [
            Start(spec.name, host_id, have.get(host_id, 0) + extra)
            for host_id, extra in sorted(wanted.items())
        ]
        if why:
            unplaceable[spec.name] = why
    return Plan(tuple(starts), unplaceable)


def _place_missing(
    spec: ModelSpec, hosts: list[HostCapacity], missing: int, mode: str
) -> tuple[dict[str, int], str]:
    """host -> replicas to add there; and why the rest could not be placed ("" if all were)."""
    added: dict[str, int] = {}
    for _ in range(missing):
        try:
            ranked = place(spec.name, spec, hosts, mode=mode)
        except FailedPrecondition as exc:
            return added, str(exc)
        if not ranked:
            return added, f"model {spec.name!r}: no host can take another replica"
        best = ranked[0]
        added[best] = added.get(best, 0) + 1
        hosts = [_one_more(h, spec.name) if h.host_id == best else h for h in hosts]
    return added, ""


def _one_more(host: HostCapacity, model: str) -> HostCapacity:
    replicas = dict(host.model_replicas)
    replicas[model] = replicas.get(model, 0) + 1
    return replace(host, loaded=host.loaded + 1, model_replicas=replicas)
