"""The `modeld` client verbs, run as subprocesses against a real daemon, as a person would."""

import argparse
import json
import re
import stat
from pathlib import Path

from backend_proc import free_port
from cli_proc import following, modeld, read_line
from daemon_proc import running_daemon, start_daemon, write_config
from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld.cli.main import build_parser
from modeld.client.connect import default_addr

ECHO = """
[backends.echo]
command = ["{python}", "-m", "modeld.backends.echo", "--addr", "{addr}"]
stop_grace = "2s"
[models.echo]
backend = "echo"
idle_ttl = "1h"
"""
PS_HEADER = ["MODEL", "REPLICA", "STATE", "ADDRESS", "PID", "GPU", "MEMORY", "IN-FLIGHT",
             "IDLE FOR", "UNTIL EVICTION"]  # fmt: skip


def columns(table: str) -> list[list[str]]:
    """Rows of a printed table, split on the runs of two or more spaces between cells."""
    return [re.split(r"\s{2,}", line.strip()) for line in table.strip().splitlines()]


async def test_load_ps_route_release_unload(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, ECHO) as d:
        at = ("--addr", d.addr)
        loaded = await modeld("load", "echo", *at)
        assert loaded.code == 0, loaded.err
        lines = loaded.out.splitlines()
        phases = [
            m.group(1)
            for line in lines
            if (m := re.match(r"\s*[\d.]+s  \w+  (\w+(?: \w+)?)", line))
        ]
        assert phases == ["starting", "waiting ready", "loading", "ready"]
        assert re.fullmatch(r"echo: 1 replica\(s\) ready in \d+\.\d\ds", lines[4])

        ps = await modeld("ps", *at)
        assert ps.code == 0, ps.err
        header, row = columns(ps.out)
        assert header == PS_HEADER
        assert row[0] == "echo" and row[2] == "READY" and row[7] == "0"
        assert re.fullmatch(r"\d+s", row[8])
        assert re.fullmatch(r"59m\d\ds", row[9])
        replica = json.loads((await modeld("ps", "--json", *at)).out)["replicas"][0]
        assert replica["state"] == "READY" and replica["in_flight"] == 0
        assert 3500 < replica["until_eviction_seconds"] <= 3600

        routed = await modeld("route", "echo", "--json", "--affinity-key", "session-1", *at)
        assert routed.code == 0, routed.err
        lease = json.loads(routed.out)
        assert lease["address"] == replica["address"] and lease["cold_start"] is False
        busy = columns((await modeld("ps", *at)).out)[1]
        assert (busy[7], busy[8], busy[9]) == ("1", "-", "busy")
        # --wide adds what a load_metrics backend reports; echo reports nothing.
        wide_header, wide = columns((await modeld("ps", "--wide", *at)).out)
        assert wide_header == [*PS_HEADER, "WAITING", "RUNNING", "KV CACHE"]
        assert wide[-3:] == ["-", "-", "-"]

        released = await modeld("release", lease["lease_id"], *at)
        assert (released.code, released.out) == (0, "released\n")
        again = await modeld("release", lease["lease_id"], *at)
        assert again.out == "not held (already released or expired)\n"

        unloaded = await modeld("unload", "echo", *at)
        assert unloaded.code == 0, unloaded.err
        assert unloaded.out.startswith("stopped 1 replica(s)\n")
        assert columns(unloaded.out)[2][2] == "STOPPED"
        after = await d.stub.ListReplicas(pb.ListReplicasRequest(model="echo"))
        assert [r.state for r in after.replicas] == [pb.STOPPED]


async def test_logs_events_and_health(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, ECHO) as d:
        at = ("--addr", d.addr)
        async with following("events", "echo", "--json", *at) as events:
            assert await read_line(events, stream="stderr") == "watching replica events of echo"
            assert (await modeld("load", "echo", "--json", *at)).code == 0
            seen = [json.loads(await read_line(events)) for _ in range(4)]
        assert [e["to_state"] for e in seen] == ["STARTING", "WAITING_READY", "LOADING", "READY"]
        assert {e["model"] for e in seen} == {"echo"}

        logs = await modeld("logs", "echo", *at)
        assert logs.code == 0, logs.err
        assert "modeld: spawned pid" in logs.out
        assert "stderr: echo_backend listening" in logs.out
        lines = [
            json.loads(line)
            for line in (await modeld("logs", "echo", "--json", *at)).out.splitlines()
        ]
        assert {line["stream"] for line in lines} >= {"modeld", "stderr"}
        async with following("logs", "echo", "-f", "--tail", "1", *at) as follow:
            assert re.match(r"\d\d:\d\d:\d\d\.\d{3} \w+ modeld: ready at ", await read_line(follow))

        health = await modeld("health", "echo", "--probe", *at)
        assert health.code == 0, health.err
        header, row = columns(health.out)
        assert header[:5] == ["MODEL", "REPLICA", "STATE", "ADDRESS", "PROBE"]
        assert (row[0], row[2], row[4]) == ("echo", "READY", "ok")
        report = json.loads((await modeld("health", "--json", *at)).out)
        assert report["models"][0]["replicas"][0]["last_probe_ok"] is True


async def test_models_settings_and_errors(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, ECHO) as d:
        at = ("--addr", d.addr)
        models = await modeld("models", *at)
        assert columns(models.out)[1][:2] == ["echo", "echo"]
        assert "1h00m" in models.out
        assert (
            json.loads((await modeld("models", "--json", *at)).out)["models"][0]["idle_ttl"]
            == "3600s"
        )

        changed = await modeld(
            "settings", "--idle-timeout", "5m", "--max-loaded", "3", "--json", *at
        )
        assert changed.code == 0, changed.err
        assert json.loads(changed.out)["idle_timeout"] == "300s"
        shown = dict(map(tuple, columns((await modeld("settings", *at)).out)[1:]))
        assert shown["idle_timeout"] == "5m00s" and shown["max_loaded"] == "3"

        for argv, code in (
            (("route", "nope"), "NOT_FOUND"),
            (("unload", "--replica", "zz"), "NOT_FOUND"),
            (("settings", "--memory-threshold", "3"), "INVALID_ARGUMENT"),
        ):
            failed = await modeld(*argv, *at)
            assert failed.code == 1, argv
            assert failed.out == ""
            assert re.fullmatch(rf"modeld: {code}: [^\n]+\n", failed.err), failed.err
        # With --json the error is JSON on stdout (test_first_hour.py has the exact text).
        as_json = await modeld("route", "nope", "--json", *at)
        assert (as_json.code, as_json.err) == (1, "")
        assert json.loads(as_json.out)["error"]["code"] == "NOT_FOUND"
        bad_flag = await modeld("settings", "--idle-timeout", "soon", *at)
        assert bad_flag.code == 2
        assert bad_flag.err.startswith("modeld: --idle-timeout: expected a duration")

    gone = await modeld("ps", "--addr", f"127.0.0.1:{free_port()}", "--timeout", "5")
    assert gone.code == 1
    assert gone.err.startswith("modeld: UNAVAILABLE: ")


async def test_address_from_env_and_unix_socket(tmp_path: Path) -> None:
    config, addr = write_config(tmp_path, ECHO)
    sock = tmp_path / "run" / "modeld.sock"
    d = await start_daemon(config, addr, "--listen", addr, "--listen", f"unix://{sock}")
    try:
        assert stat.S_IMODE(sock.stat().st_mode) == 0o660
        via_env = await modeld("models", "--json", env={"MODELD_ADDR": addr})
        assert via_env.code == 0, via_env.err
        assert json.loads(via_env.out)["models"][0]["name"] == "echo"
        via_socket = await modeld("models", env={"MODELD_ADDR": f"unix://{sock}"})
        assert via_socket.code == 0, via_socket.err
        dead = f"127.0.0.1:{free_port()}"
        flag_wins = await modeld("models", "--addr", addr, env={"MODELD_ADDR": dead})
        assert flag_wins.code == 0, flag_wins.err
        env_used = await modeld("models", "--timeout", "5", env={"MODELD_ADDR": dead})
        assert env_used.code == 1
        assert env_used.err.startswith("modeld: UNAVAILABLE: ")
        assert dead in env_used.err
    finally:
        assert await d.stop() == 0
    assert not sock.exists()


def test_every_verb_documents_json_and_the_connection_flags() -> None:
    parser = build_parser()
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    client_verbs = set(verbs.choices) - {"serve", "config", "gateway"}
    assert client_verbs == {"ps", "models", "load", "unload", "route", "release", "health",
                            "logs", "events", "settings", "hosts"}  # fmt: skip
    for name in client_verbs:
        helped = verbs.choices[name].format_help()
        for flag in ("--json", "--addr", "--token-file", "--tls-ca", "--tls-cert", "--tls-key"):
            assert flag in helped, (name, flag)
        assert "MODELD_ADDR" in helped and "MODELD_TOKEN_FILE" in helped
    # The gateway is a long-running client: the connection flags, no --json.
    helped = verbs.choices["gateway"].format_help()
    for flag in ("--listen", "--config", "--addr", "--token-file", "--tls-ca", "--timeout"):
        assert flag in helped, ("gateway", flag)


def test_default_address(tmp_path: Path) -> None:
    sock = tmp_path / "modeld.sock"
    assert default_addr({}, sock) == "127.0.0.1:50051"
    sock.touch()
    assert default_addr({}, sock) == f"unix://{sock}"
    assert default_addr({"MODELD_ADDR": "10.0.0.2:7000"}, sock) == "10.0.0.2:7000"


def test_the_daemon_verbs_parse_alike_without_the_client_verbs() -> None:
    # `modeld serve` and `config show` are parsed without the client verbs (their
    # imports are start-up time); what they parse must not change for it.
    lines = [
        ["serve", "--config", "m.toml", "--listen", "a:1", "--listen", "b:2", "--log-level", "x"],
        ["serve", "--state-dir", "s", "--models-dir", "m"],
        ["config", "show", "--config", "m.toml"],
    ]
    for argv in lines:
        assert vars(build_parser(daemon_only=True).parse_args(argv)) == vars(
            build_parser().parse_args(argv)
        ), argv
