"""Backend ports: a configured range outside the kernel's ephemeral range, ports in use
skipped, and a port lost to someone else between modeld's choice and the backend's bind
retried on another one, whatever words the backend used to say so (issue 21, finding 7).
"""

import asyncio
import contextlib
import random
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon_proc import running_daemon
from modeld import config
from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld.errors import ConfigError
from modeld.supervisor.ports import PortRange, bind_failed, ephemeral_overlap
from modeld.supervisor.readiness import StartFailed

BIND_BACKEND = Path(__file__).parent / "backends" / "bind_backend.py"
# Below the kernel's usual ephemeral range (32768-60999) and the daemon's default range.
TEST_PORTS = (10000, 19000)


@contextlib.contextmanager
def held(*ports: int) -> Iterator[None]:
    """Listen on each port on 127.0.0.1 while the block runs."""
    with contextlib.ExitStack() as stack:
        for port in ports:
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", port))
            sock.listen()
        yield


def free_block(size: int) -> int:
    """The first port of `size` consecutive ports that are free now."""
    while True:
        first = random.randrange(*TEST_PORTS)
        try:
            with held(*range(first, first + size)):
                return first
        except OSError:
            continue


@pytest.mark.parametrize(
    "said",
    [
        # grpc-python's add_insecure_port
        "RuntimeError: Failed to bind to address 127.0.0.1:20001; set GRPC_VERBOSITY=debug",
        # uvicorn (vLLM, llama_cpp.server)
        "ERROR:    [Errno 98] error while attempting to bind on address ('127.0.0.1', 20001)",
        # llama.cpp's llama-server
        "main: couldn't bind HTTP server socket, hostname: 127.0.0.1, port: 20001",
        # LocalAI's Go backends
        "listen tcp 127.0.0.1:20001: bind: address already in use",
        "OSError: [Errno 98] Address already in use",
    ],
)
def test_every_bind_failure_seen_in_the_field_is_a_lost_race(said: str) -> None:
    assert bind_failed(said)


def test_other_failures_are_not_lost_races() -> None:
    assert not bind_failed("OSError: [Errno 99] Cannot assign requested address")
    assert not bind_failed("error: cannot open model /m.gguf")


def test_ports_go_round_the_range_skipping_those_in_use() -> None:
    first = free_block(3)
    ports = PortRange(first, first + 2, start=first)
    with held(first + 1):
        assert [ports("127.0.0.1") for _ in range(3)] == [first, first + 2, first]
    with held(first, first + 1, first + 2), pytest.raises(StartFailed, match="in use") as full:
        ports("127.0.0.1")
    assert f"backend_ports {first}-{first + 2}" in str(full.value)


def test_backend_ports_is_a_range_and_checked() -> None:
    assert config.load(env={}).backend_ports == config.DEFAULT_BACKEND_PORTS
    assert config.load(env={"MODELD_BACKEND_PORTS": "15000-15009"}).backend_ports == (
        15000,
        15009,
    )
    for bad in ("15009-15000", "80-90", "15000", "15000-70000", "a-b"):
        with pytest.raises(ConfigError, match="backend_ports"):
            config.load(env={"MODELD_BACKEND_PORTS": bad})


def test_a_range_overlapping_the_ephemeral_range_is_warned_about(tmp_path: Path) -> None:
    proc = tmp_path / "ip_local_port_range"
    proc.write_text("32768\t60999\n")
    assert ephemeral_overlap(config.DEFAULT_BACKEND_PORTS, proc) is None
    warning = ephemeral_overlap((30000, 40000), proc)
    assert warning is not None and "32768-60999" in warning
    assert ephemeral_overlap((30000, 40000), tmp_path / "absent") is None


async def until_file(folder: Path, pattern: str, limit_s: float) -> Path:
    """Wait for a file the backend writes (outside the test's own process)."""
    end = time.monotonic() + limit_s
    while not (found := sorted(folder.glob(pattern))):
        if time.monotonic() > end:
            raise AssertionError(f"no {pattern} in {folder} within {limit_s}s")
        await asyncio.sleep(0.02)
    return found[0]


async def test_a_port_taken_before_the_backend_binds_is_retried_on_another(
    tmp_path: Path,
) -> None:
    first = free_block(3)
    gate = tmp_path / "gate"
    gate.mkdir()
    # The backend's own interpreter (as a venv's would be), which {python} expands to.
    own_python = tmp_path / "venv-python"
    own_python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    own_python.chmod(0o755)
    body = f"""
backend_ports = "{first}-{first + 2}"
[backends.raced]
python = "{own_python}"
command = ["{{python}}", "{BIND_BACKEND}", "--host", "{{host}}", "--port", "{{port}}",
           "--say", "grpc", "--gate", "{gate}"]
stop_grace = "2s"
[models.raced]
backend = "raced"
"""
    # The start of the range is in use: modeld must skip it (no attempt lost on it).
    with held(first):
        async with running_daemon(tmp_path, body) as d:
            routing = asyncio.ensure_future(d.stub.Route(pb.RouteRequest(model="raced")))
            waiting = await until_file(gate, "waiting-*", 30)
            chosen = int(waiting.name.removeprefix("waiting-"))
            assert chosen in (first + 1, first + 2)
            # Someone takes the chosen port after modeld checked it and before the
            # backend binds; the backend then fails as grpc-python does (exit 1).
            with held(chosen):
                (gate / "go").write_text("")
                reply = await asyncio.wait_for(routing, 60)
                other = ({first + 1, first + 2} - {chosen}).pop()
                assert reply.address == f"127.0.0.1:{other}"
            taken = [e for e in d.log if e.get("event") == "replica_port_taken"]
            assert [e["port"] for e in taken] == [chosen]
            logs = d.stub.StreamLogs(pb.StreamLogsRequest(replica_id=reply.replica_id, tail=100))
            spawned = [ln.text async for ln in logs if ln.text.startswith("spawned pid")]
            assert len(spawned) == 2
            assert all(f": {own_python} {BIND_BACKEND}" in line for line in spawned), spawned
            await d.stub.Release(pb.ReleaseRequest(lease_id=reply.lease_id))
            listed = await d.stub.ListReplicas(pb.ListReplicasRequest(model="raced"))
            assert [(r.state, r.restarts) for r in listed.replicas] == [(pb.READY, 1)]
