"""`modeld gateway` with the official `openai` SDK, against a real daemon and real backends.

One daemon and one gateway for the module (a second gateway for API keys): the demo
HTTP backend answers chat completions (whole and streamed), embeddings and models; a
wrapper backend (tests/backends/split_http.py) lets the test kill -9 a replica's server
while its replica still looks alive to modeld.
"""

import os
import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import openai
import pytest
import pytest_asyncio

from backend_proc import free_port
from daemon_proc import DaemonProc, running_daemon, wait_pids_gone
from gateway_proc import GatewayProc, running_gateway
from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld.backends.echo import embed

pytestmark = pytest.mark.asyncio(loop_scope="module")

SPLIT = Path(__file__).parent / "backends" / "split_http.py"
RETRY_AFTER_S = 7
KEY = "sk-gateway-test-key"
CATALOG = f"""
[leases]
max_per_replica = 2
[gateway]
retry_after = "{RETRY_AFTER_S}s"
route_timeout = "30s"
[backends.echo-http]
command = ["{{python}}", "-m", "modeld.backends.echo_http", "--addr", "{{addr}}"]
protocol = "http"
stop_grace = "2s"
[backends.slow-http]
command = ["{{python}}", "-m", "modeld.backends.echo_http", "--addr", "{{addr}}",
           "--token-delay", "0.2"]
protocol = "http"
stop_grace = "2s"
[backends.split-http]
command = ["{{python}}", "{SPLIT}", "--addr", "{{addr}}", "--token-delay", "0.02"]
protocol = "http"
stop_grace = "2s"
[backends.echo]
command = ["{{python}}", "-m", "modeld.backends.echo", "--addr", "{{addr}}"]
stop_grace = "2s"
[models.chat]
backend = "echo-http"
[models.slow]
backend = "slow-http"
max_replicas = 1
# Renewed every ~0.7 s while an answer streams.
lease_ttl = "2s"
[models.pair]
backend = "split-http"
min_replicas = 2
max_replicas = 2
[models.grpc-echo]
backend = "echo"
"""
CHAT = [{"role": "user", "content": "hello there, gateway"}]


class Stack:
    def __init__(self, daemon: DaemonProc, gateway: GatewayProc) -> None:
        self.daemon = daemon
        self.gateway = gateway
        self.openai = openai.AsyncOpenAI(
            base_url=gateway.base_url, api_key=KEY, max_retries=0, timeout=30
        )

    async def metric(self, name: str) -> float:
        url = f"http://{self.gateway.listen}/metrics"
        async with aiohttp.ClientSession() as session, session.get(url) as reply:
            text = await reply.text()
        match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
        return float(match[1]) if match else 0.0

    async def replicas(self, model: str) -> list[pb.Replica]:
        reply = await self.daemon.stub.ListReplicas(pb.ListReplicasRequest(model=model))
        return list(reply.replicas)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    tmp = tmp_path_factory.mktemp("gateway")
    keys = tmp / "keys"
    keys.write_text(f"# the test's key\n\n{KEY}\n")
    env = {"MODELD_GATEWAY_API_KEYS_FILE": str(keys)}
    async with (
        running_daemon(tmp, CATALOG) as daemon,
        running_gateway(daemon.addr, daemon.config, env) as gateway,
    ):
        s = Stack(daemon, gateway)
        yield s
        await s.openai.close()


async def test_a_chat_completion_is_the_replicas_answer(stack: Stack) -> None:
    answer = await stack.openai.chat.completions.create(model="chat", messages=CHAT)
    assert answer.choices[0].message.content == "hello there, gateway"
    assert answer.model == "chat"
    assert answer.usage is not None and answer.usage.completion_tokens == 3
    text = await stack.openai.completions.create(model="chat", prompt="say this", max_tokens=1)
    assert (text.choices[0].text, text.choices[0].finish_reason) == ("say ", "length")


async def test_a_streamed_chat_completion_arrives_in_chunks(stack: Stack) -> None:
    stream = await stack.openai.chat.completions.create(model="chat", messages=CHAT, stream=True)
    pieces = [chunk.choices[0].delta.content async for chunk in stream if chunk.choices]
    assert "".join(p or "" for p in pieces) == "hello there, gateway"
    assert [p for p in pieces if p] == ["hello ", "there, ", "gateway"]


async def test_embeddings_and_the_model_list(stack: Stack) -> None:
    reply = await stack.openai.embeddings.create(model="chat", input=["one", "two"])
    assert [e.embedding for e in reply.data] == [embed("one"), embed("two")]
    models = [m.id async for m in stack.openai.models.list()]
    # The gRPC-protocol model speaks no HTTP: not offered.
    assert sorted(models) == ["chat", "pair", "slow"]


async def test_an_unknown_model_is_not_found(stack: Stack) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await stack.openai.chat.completions.create(model="no-such-model", messages=CHAT)
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["code"] == "model_not_found"
    assert "no-such-model" in caught.value.message


async def test_a_grpc_backend_gets_a_clear_400(stack: Stack) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await stack.openai.chat.completions.create(model="grpc-echo", messages=CHAT)
    assert "protocol 'grpc'" in caught.value.message
    assert [r.in_flight for r in await stack.replicas("grpc-echo")] == [0]


async def test_bad_json_and_no_model_are_400_in_openai_error_json(stack: Stack) -> None:
    url = f"{stack.gateway.base_url}/chat/completions"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as session:
        for body, words in ((b"{not json", "not valid JSON"), (b'{"messages": []}', "no model")):
            async with session.post(url, data=body) as reply:
                assert reply.status == 400
                error = (await reply.json())["error"]
            assert words in error["message"]
            assert set(error) == {"message", "type", "param", "code"}
        async with session.get(f"http://{stack.gateway.listen}/health") as reply:
            assert (reply.status, (await reply.json())["modeld"]) == (200, "ok")


async def server_pid(daemon: DaemonProc, replica_id: str) -> int:
    request = pb.StreamLogsRequest(replica_id=replica_id, tail=1000, follow=False)
    async for line in daemon.stub.StreamLogs(request, timeout=10):
        if match := re.fullmatch(r"server pid (\d+)", line.text):
            return int(match[1])
    raise AssertionError(f"replica {replica_id} logged no server pid")


async def test_a_replica_killed_before_the_request_is_invisible_to_the_client(
    stack: Stack,
) -> None:
    replicas = await stack.replicas("pair")
    assert len(replicas) == 2 and all(r.state == pb.READY for r in replicas)
    # The replica used last is picked last: the other one is what the next Route gets.
    used = await stack.daemon.stub.Route(pb.RouteRequest(model="pair"), timeout=10)
    await stack.daemon.stub.Release(pb.ReleaseRequest(lease_id=used.lease_id))
    victim = next(r for r in replicas if r.id != used.replica_id)
    pid = await server_pid(stack.daemon, victim.id)
    os.kill(pid, signal.SIGKILL)
    assert await wait_pids_gone([pid], 10) == []
    retries = await stack.metric("modeld_gateway_upstream_retries_total")

    answer = await stack.openai.chat.completions.create(model="pair", messages=CHAT)

    assert answer.choices[0].message.content == "hello there, gateway"
    assert await stack.metric("modeld_gateway_upstream_retries_total") == retries + 1
    # modeld heard that the replica was unreachable, found its port refusing and stopped it.
    found = await stack.daemon.wait_log(
        lambda e: (
            e.get("event") == "replica_health"
            and e.get("to_health") == "DEAD"
            and e.get("replica_id") == victim.id
        )
    )
    assert found["model"] == "pair"


async def test_a_replica_dying_mid_stream_ends_the_stream_with_an_error_event(
    stack: Stack,
) -> None:
    words = " ".join(f"w{i}" for i in range(200))  # 4 s of answer at 0.02 s a word
    stream = await stack.openai.chat.completions.create(
        model="pair", messages=[{"role": "user", "content": words}], stream=True
    )
    seen = []
    with pytest.raises(openai.APIError) as caught:
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                seen.append(chunk.choices[0].delta.content)
                if len(seen) == 1:
                    [replica] = [r for r in await stack.replicas("pair") if r.in_flight]
                    os.kill(await server_pid(stack.daemon, replica.id), signal.SIGKILL)
    # Chunks already on their way may still arrive after the kill; the rest never do.
    assert seen[0] == "w0 " and len(seen) < 200, seen
    assert "broke off" in caught.value.message
    # Its exit, or the release as unreachable and its refusing port, ends the replica.
    await stack.daemon.wait_log(
        lambda e: (
            e.get("replica_id") == replica.id
            and (
                (e.get("event") == "replica_health" and e.get("to_health") == "DEAD")
                or (e.get("event") == "replica_state" and e.get("from_state") == "READY")
            )
        )
    )


async def test_a_long_stream_is_renewed_and_a_client_gone_mid_stream_holds_no_lease(
    stack: Stack,
) -> None:
    words = " ".join(f"w{i}" for i in range(60))  # 12 s of answer at 0.2 s a word
    log = stack.gateway.log
    start = len(log)
    stream = await stack.openai.chat.completions.create(
        model="slow", messages=[{"role": "user", "content": words}], stream=True
    )
    seen = []
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            seen.append(chunk.choices[0].delta.content)
            break
    # Streaming on past the lease's 2 s would lose it, unless the gateway renews it (over
    # its RouteStream, so the daemon logs no RenewLease call: the gateway says it).
    renewed = await stack.gateway.wait_event("gateway_lease_renewed", since=start)
    assert renewed["renewals"] >= 1
    [replica] = await stack.replicas("slow")
    assert replica.in_flight == 1
    start = len(log)
    await stream.close()

    gone = await stack.gateway.wait_event("gateway_client_gone", since=start)
    assert gone["lease_id"] == renewed["lease_id"]
    [replica] = await stack.replicas("slow")
    assert (replica.in_flight, replica.live_leases) == (0, 0)
    assert seen == ["w0 "]
    # The replica's answer was cut, not finished: it never logged the request as answered.
    logs = stack.daemon.stub.StreamLogs(
        pb.StreamLogsRequest(replica_id=replica.id, tail=1000), timeout=10
    )
    assert "POST /v1/chat/completions 200" not in [line.text async for line in logs]


async def test_a_full_model_is_429_with_retry_after(stack: Stack) -> None:
    # The one replica of "slow" (max_leases_per_replica = 2), warm after the test above.
    held = [await stack.daemon.stub.Route(pb.RouteRequest(model="slow"), timeout=30)]
    held.append(await stack.daemon.stub.Route(pb.RouteRequest(model="slow"), timeout=30))
    try:
        with pytest.raises(openai.RateLimitError) as caught:
            await stack.openai.chat.completions.create(model="slow", messages=CHAT)
        assert caught.value.response.headers["retry-after"] == str(RETRY_AFTER_S)
        assert "max_leases_per_replica" in caught.value.message
    finally:
        for lease in held:
            await stack.daemon.stub.Release(pb.ReleaseRequest(lease_id=lease.lease_id))


async def test_an_api_key_is_required_when_configured(stack: Stack) -> None:
    for key in ("unused", KEY + "x"):
        guest = stack.openai.with_options(api_key=key)
        with pytest.raises(openai.AuthenticationError) as caught:
            await guest.chat.completions.create(model="chat", messages=CHAT)
        assert isinstance(caught.value.body, dict)
        assert caught.value.body["code"] == "invalid_api_key"
    assert not any(KEY in line for line in stack.gateway.raw + stack.daemon.raw)


async def test_no_modeld_is_a_503_at_once_not_a_wait(stack: Stack) -> None:
    nobody = f"127.0.0.1:{free_port()}"
    async with running_gateway(nobody, stack.daemon.config) as gateway:
        client = stack.openai.with_options(base_url=gateway.base_url)
        with pytest.raises(openai.InternalServerError) as caught:
            await client.chat.completions.create(model="chat", messages=CHAT)
    assert caught.value.status_code == 503
    assert f"no modeld answers at {nobody}" in caught.value.message
    assert caught.value.response.headers["retry-after"] == str(RETRY_AFTER_S)
