"""The CLI's tables and its idle/eviction arithmetic, on fixed data and a fixed `now`."""

import pytest

from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld.cli import render

NOW = 1_800_000_000.0


def replica(state: int = pb.READY, in_flight: int = 0, idle_s: float | None = 100) -> pb.Replica:
    r = pb.Replica(id="r1", model="m", state=state, in_flight=in_flight, address="h:1", pid=7)
    if idle_s is not None:
        r.last_used.FromNanoseconds(int((NOW - idle_s) * 1e9))
    return r


def spec(idle_ttl: float | None = None, pinned: bool = False) -> pb.ModelSpec:
    s = pb.ModelSpec(name="m", backend="b", pinned=pinned)
    if idle_ttl is not None:
        s.idle_ttl.FromSeconds(int(idle_ttl))
    return s


@pytest.mark.parametrize(
    ("r", "s", "idle_timeout", "expected"),
    [
        (replica(), spec(idle_ttl=3600), 0, render.Idle(100, 3500, "")),
        (replica(), spec(), 600, render.Idle(100, 500, "")),
        (replica(), None, 600, render.Idle(100, 500, "")),
        (replica(), spec(idle_ttl=0), 600, render.Idle(100, None, "never")),
        (replica(), spec(), 0, render.Idle(100, None, "never")),
        (replica(idle_s=900), spec(), 600, render.Idle(900, 0, "")),
        (replica(), spec(idle_ttl=60, pinned=True), 0, render.Idle(100, None, "never (pinned)")),
        (replica(in_flight=2), spec(), 600, render.Idle(None, None, "busy")),
        (replica(state=pb.LOADING), spec(), 600, render.Idle(None, None, "-")),
        (replica(idle_s=None), spec(), 600, render.Idle(None, None, "-")),
    ],
)
def test_idle_follows_the_watchdog_rule(
    r: pb.Replica, s: pb.ModelSpec | None, idle_timeout: float, expected: render.Idle
) -> None:
    got = render.idle(r, s, idle_timeout, NOW)
    assert got.note == expected.note
    assert got.idle_for == pytest.approx(expected.idle_for)
    assert got.until_eviction == pytest.approx(expected.until_eviction)


DURATIONS = [(-3, "0s"), (0.9, "0s"), (59, "59s"), (61, "1m01s"), (3599, "59m59s"),
             (3660, "1h01m"), (90000, "1d01h")]  # fmt: skip


@pytest.mark.parametrize(("seconds", "text"), DURATIONS)
def test_human_duration(seconds: float, text: str) -> None:
    assert render.human_duration(seconds) == text


def test_ps_table_aligns_columns() -> None:
    rows = [replica(), replica(in_flight=1)]
    idles = [render.idle(r, spec(idle_ttl=3600), 0, NOW) for r in rows]
    lines = render.ps_table(rows, idles).splitlines()
    assert lines[0].split() == ["MODEL", "REPLICA", "STATE", "ADDRESS", "PID", "GPU", "MEMORY",
                                "IN-FLIGHT", "IDLE", "FOR", "UNTIL", "EVICTION"]  # fmt: skip
    assert lines[1].split()[-2:] == ["1m40s", "58m20s"]
    assert lines[2].split()[-2:] == ["-", "busy"]
    starts = {line.index("UNTIL") if i == 0 else len(line) - len(line.split()[-1])
              for i, line in enumerate(lines)}  # fmt: skip
    assert len(starts) == 1


def test_health_table_names_models_without_replicas() -> None:
    table = render.health_table([pb.ModelHealth(model="idle-model")], NOW)
    assert table.splitlines()[1].split()[:3] == ["idle-model", "-", "no"]


def test_ps_table_has_a_host_column_only_in_a_cluster() -> None:
    single = render.ps_table([replica()], [render.Idle(None, None, "-")])
    assert single.splitlines()[0].split()[0] == "MODEL"
    here, there = replica(), pb.Replica(id="r2", model="m", state=pb.READY, host_id="b")
    here.host_id = "a"
    idles = [render.Idle(None, None, "-")] * 2
    lines = render.ps_table([here, there], idles).splitlines()
    assert lines[0].split()[:3] == ["HOST", "MODEL", "REPLICA"]
    assert lines[1].split()[:3] == ["a", "m", "r1"]
    # Another host's replica: no pid, GPU or memory is published.
    assert lines[2].split()[:8] == ["b", "m", "r2", "READY", "-", "-", "-", "-"]


def host(age: float | None = None, **fields: object) -> pb.Host:
    base: dict[str, object] = {
        "host_id": "gpu1", "address": "10.0.0.1:50051", "role": "node", "state": pb.HOST_ALIVE
    }  # fmt: skip
    h = pb.Host(**{**base, **fields})
    if age is not None:
        h.heartbeat_age.FromNanoseconds(int(age * 1e9))
    return h


def test_hosts_table() -> None:
    hosts = [
        host(labels={"zone": "b", "gpu": "h100"}, age=1.25, replicas=2, local=True,
             gpu_free=[12 << 30, 3 << 30], gpu_total=[80 << 30, 80 << 30]),
        host(host_id="gpu2", state=pb.HOST_SUSPECT, role="router"),
        host(host_id="gpu3", state=pb.HOST_EXPIRED, age=9),
    ]  # fmt: skip
    lines = render.hosts_table(hosts).splitlines()
    assert lines[0].split() == ["HOST", "ADDRESS", "ROLE", "STATE", "LABELS", "FREE", "MEMORY",
                                "REPLICAS", "HEARTBEAT"]  # fmt: skip
    assert lines[1].split()[:5] == ["gpu1", "(here)", "10.0.0.1:50051", "node", "alive"]
    assert "gpu=h100,zone=b" in lines[1]
    assert "  gpu0:12.0GiB/80.0GiB gpu1:3.0GiB/80.0GiB  " in lines[1]
    assert lines[1].split()[-3:] == ["2", "1.2s", "ago"]
    assert lines[2].split()[1:5] == ["10.0.0.1:50051", "router", "suspect", "-"]
    assert lines[2].split()[-1] == "-"
    assert lines[3].split()[3] == "expired"


@pytest.mark.parametrize(
    ("fields", "text"),
    [
        ({}, "-"),
        ({"gpu_free": [1 << 30]}, "gpu0:1.0GiB"),  # no total published
        ({"gpu_free": [1 << 30], "gpu_total": [2 << 30]}, "gpu0:1.0GiB/2.0GiB"),
        ({"ram_free": 1 << 30, "ram_total": 4 << 30}, "ram:1.0GiB/4.0GiB"),  # no GPU
    ],
)
def test_free_memory(fields: dict[str, object], text: str) -> None:
    assert render.free_memory(host(**fields)) == text


def test_ps_shows_a_suspect_replica_with_why() -> None:
    r = replica()
    r.suspect = "a client reported it unreachable"
    table = render.ps_table([r], [render.Idle(None, None, "")])
    assert "SUSPECT (a client reported it unreachable)" in table
    assert "SUSPECT" not in render.ps_table([replica()], [render.Idle(None, None, "")])
