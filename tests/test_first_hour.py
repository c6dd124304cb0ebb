"""What a newcomer meets in the first hour (issue 22): each message names the next step.

The CLI runs as subprocesses and the daemon as a real process; the config and help
checks run in-process (they are pure).
"""

import asyncio
import json
import socket
from pathlib import Path

import grpc
import pytest

from backend_proc import free_port
from cli_proc import modeld
from daemon_proc import ECHO_CATALOG, running_daemon, start_daemon, write_config
from modeld import config
from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld.cli import verbs
from modeld.cli.main import build_parser
from modeld.client import Client, ModeldError, NotFound
from modeld.errors import ConfigError
from modeld.policy.placement import unrunnable
from modeld.policy.view import GpuView
from modeld.routing.stops import DEFAULT_DRAIN
from modeld.spec import ModelSpec

CATALOG = (
    ECHO_CATALOG
    + """
[backends.ghost]
command = ["/nonexistent/ghost-server", "--port", "{port}"]
protocol = "http"
[models.ghost]
backend = "ghost"
[models.gpu-model]
backend = "echo"
gpus = 1
"""
)
NOT_DEFINED = (
    "model 'nope' is not defined; `modeld models` (the ListModels RPC) lists the models "
    "modeld knows"
)


def verb_help(verb: str) -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "verb")
    return str(sub.choices[verb].format_help())  # type: ignore[attr-defined]


def write(tmp_path: Path, body: str) -> str:
    path = tmp_path / "c.toml"
    path.write_text(body)
    return str(path)


# 1, 12, 13 and 8 against one daemon


async def test_a_daemon_tells_what_it_does_and_what_to_do(tmp_path: Path) -> None:
    fake = tmp_path / "resources.json"
    fake.write_text(json.dumps({"ram_total": 1 << 34, "ram_available": 1 << 33, "gpus": []}))
    body = f'[resources]\nfake_path = "{fake}"\n' + CATALOG
    async with running_daemon(tmp_path, body) as d:
        at = ("--addr", d.addr)
        # 12: a model that needs a GPU on a host without one is named at the start.
        warned = await d.wait_log(lambda e: e.get("event") == "models_cannot_run_here")
        assert warned["models"] == {"gpu-model": "model needs 1 GPU(s); this host has 0 (none)"}

        # 8 and 13: a CLI user is pointed at the CLI verb, and --json errors are JSON.
        plain = await modeld("route", "nope", *at)
        assert (plain.code, plain.err) == (1, f"modeld: NOT_FOUND: {NOT_DEFINED}\n")
        as_json = await modeld("route", "nope", "--json", *at)
        assert as_json.code == 1 and as_json.err == ""
        assert json.loads(as_json.out) == {"error": {"code": "NOT_FOUND", "message": NOT_DEFINED}}

        # 13: singular, and a command that never ran has no stderr to quote.
        with pytest.raises(grpc.aio.AioRpcError) as many:
            await d.stub.Load(pb.LoadRequest(model="echo", replicas=2))
        assert many.value.details() == (
            "model 'echo' allows at most 1 replica (max_replicas), and 2 were asked for"
        )
        with pytest.raises(grpc.aio.AioRpcError) as ghost:
            await d.stub.Load(pb.LoadRequest(model="ghost"))
        assert "wrote nothing to stderr" not in (ghost.value.details() or "")
        assert (ghost.value.details() or "").endswith(
            "cannot run '/nonexistent/ghost-server': no such executable\n"
            "(no process was started: check backends.ghost.command)"
        )

        # 1: unloading with a lease out says it waits, how long, and that it cut it short.
        lease = await d.stub.Route(pb.RouteRequest(model="echo"))
        unloaded = await modeld("unload", "echo", "--drain", "0.5s", *at)
        assert unloaded.code == 0, unloaded.err
        lines = unloaded.out.splitlines()
        assert lines[0] == (
            "waiting up to 0.5s for 1 lease(s) to end "
            "(--force stops at once, --drain sets the wait)"
        )
        assert lines[1] == "stopped 1 replica(s)"
        assert lines[-1] == (
            f"replica {lease.replica_id}: drain cut short: 1 lease(s) still out after 0.5s "
            "were ended"
        )
        assert lines[-1].split(": ", 1)[1].startswith(verbs.DRAIN_CUT_SHORT)

        # 9: the Python client raises a typed error carrying the status and the message.
        def lease_nope() -> ModeldError:
            with (
                Client(d.addr) as client,
                pytest.raises(NotFound) as refused,
                client.lease("nope"),
            ):
                pass
            return refused.value

        refused = await asyncio.to_thread(lease_nope)
        assert (refused.status, refused.message) == (grpc.StatusCode.NOT_FOUND, NOT_DEFINED)


# 6 and 13: no daemon, bad flags


async def test_no_daemon_and_bad_flags_name_the_next_step() -> None:
    addr = f"127.0.0.1:{free_port()}"
    nobody = (
        f"no modeld answers at {addr} (connection refused); is it running? Start it with "
        "`modeld serve` (`make run` in a checkout), or see `systemctl status modeld`"
    )
    plain, as_json, bad_flag, no_target = await asyncio.gather(
        modeld("ps", "--addr", addr, "--timeout", "10"),
        modeld("ps", "--json", "--addr", addr, "--timeout", "10"),
        modeld("ps", "--json", "--bogus"),
        modeld("unload", "--json", "--addr", addr),
    )
    assert (plain.code, plain.err) == (1, f"modeld: UNAVAILABLE: {nobody}\n")
    assert as_json.code == 1
    assert json.loads(as_json.out) == {"error": {"code": "UNAVAILABLE", "message": nobody}}
    assert bad_flag.code == 2 and bad_flag.err == ""
    assert json.loads(bad_flag.out) == {
        "error": {"code": "INVALID_ARGUMENT", "message": "modeld: unrecognized arguments: --bogus"}
    }
    assert no_target.code == 2
    assert json.loads(no_target.out)["error"] == {
        "code": "INVALID_ARGUMENT",
        "message": "unload: name a MODEL or --replica ID",
    }


# 7: the daemon's port is taken


async def test_a_taken_port_is_named_as_such(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        path, addr = write_config(tmp_path, ECHO_CATALOG, port)
        d = await start_daemon(path, addr, wait=False)
        code = await asyncio.wait_for(d.proc.wait(), 30)
        await d.close()
    assert code == 2
    said = (
        f"modeld: listen: cannot bind {addr}: address already in use; is another modeld "
        f"running there? (`modeld health --addr {addr}` asks it)"
    )
    assert said in d.raw, "\n".join(d.raw[-10:])


# 2, 1: help that matches the behaviour


def test_help_says_what_the_daemon_accepts() -> None:
    settings = " ".join(verb_help("settings").split())
    assert "--watchdog-interval WATCHDOG_INTERVAL how often the watchdog looks, 10ms..1h" in (
        settings
    )
    assert "(it cannot be turned off)" in settings
    unload = " ".join(verb_help("unload").split())
    assert f"(default: {DEFAULT_DRAIN:g}s)" in unload
    assert verbs.DEFAULT_DRAIN_S == DEFAULT_DRAIN


# 4, 5: config


def test_a_first_model_may_use_the_demo_backends(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, '[models.mine]\nbackend = "echo"\n'), env={})
    assert set(cfg.models) == {"mine"}
    assert set(cfg.backends) == {"echo", "echo-http"}
    own = '[backends.llama]\ncommand = ["llama-server"]\n[models.mine]\nbackend = "echo"\n'
    with pytest.raises(ConfigError) as refused:
        config.load(write(tmp_path, own), env={})
    assert str(refused.value) == (
        "config: models.mine: model 'mine': backend 'echo' is not in the catalog (known: "
        "llama); the demo backends (echo, echo-http) are built in only while the config file "
        "has no [backends] table: define [backends.echo] in it (README, Configuration)"
    )


def test_an_unknown_placeholder_is_a_config_error(tmp_path: Path) -> None:
    body = '[backends.b]\ncommand = ["srv", "--port", "{prot}", "--json", "{\\"a\\": 1}"]\n'
    with pytest.raises(ConfigError) as refused:
        config.load(write(tmp_path, body), env={})
    assert str(refused.value) == (
        "config: backends.b.command: unknown placeholder {prot}; known: {addr}, {host}, "
        "{port}, {model_file}, {models_dir}, {python}"
    )
    fine = '[backends.b]\ncommand = ["srv", "--port", "{port}", "{\\"a\\": 1}"]\n'
    assert config.load(write(tmp_path, fine), env={}).backends["b"].command[2] == "{port}"


def test_unrunnable_names_the_models_a_host_cannot_place() -> None:
    gpu = GpuView(0, "GPU-0", "fake", 8 << 30, 0)
    specs = [
        ModelSpec(name="any", backend="echo"),
        ModelSpec(name="one", backend="echo", gpus=1),
        ModelSpec(name="two", backend="echo", gpus=2),
        ModelSpec(name="pinned", backend="echo", gpu_ids=(3,)),
    ]
    assert unrunnable(specs, [gpu]) == {
        "two": "model needs 2 GPU(s); this host has 1 (0)",
        "pinned": "gpu_ids [3] not present on this host (has 0)",
    }
    assert set(unrunnable(specs, [])) == {"one", "two", "pinned"}
    assert unrunnable(specs, [])["one"] == "model needs 1 GPU(s); this host has 0 (none)"
