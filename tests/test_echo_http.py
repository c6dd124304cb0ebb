"""The demo backend over HTTP (`echo-http`), as a real process."""

import asyncio
import json
import re
from typing import Any

import aiohttp

from backend_proc import running_backend
from modeld import config
from modeld.backends.echo import embed

ECHO_HTTP = "modeld.backends.echo_http"
CHAT = "/v1/chat/completions"


def chat_body(text: str, **extra: Any) -> dict[str, Any]:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}]
    return {"model": "echo-http", "messages": messages, **extra}


async def events(response: aiohttp.ClientResponse) -> list[Any]:
    """The `data:` payloads of a server-sent event stream, parsed, up to `[DONE]`."""
    out: list[Any] = []
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if line == "data: [DONE]":
            return out
        if line.startswith("data: "):
            out.append(json.loads(line.removeprefix("data: ")))
    raise AssertionError(f"the stream ended without [DONE] after {out}")


def gauges(text: str) -> dict[str, float]:
    """`name value` of every unlabelled-or-labelled sample line, labels dropped."""
    found = re.findall(r"^([\w:]+)(?:\{[^}]*\})? (\S+)$", text, re.MULTILINE)
    return {name: float(value) for name, value in found}


def test_the_demo_catalog_has_echo_http() -> None:
    # test_readme.py leases it from a daemon and sends it requests, as README shows.
    demo = config.load(env={})
    assert demo.models["echo-http"].backend == "echo-http"
    backend = demo.backends["echo-http"]
    assert (backend.protocol, backend.health_path) == ("http", "/health")
    assert backend.command[1:3] == ("-m", ECHO_HTTP)


async def test_echo_http_answers_like_an_openai_server() -> None:
    async with running_backend(module=ECHO_HTTP) as backend:
        async with aiohttp.ClientSession(f"http://{backend.addr}") as http:
            async with http.post(CHAT, json=chat_body("hello  brave world")) as r:
                assert r.status == 200
                whole = await r.json()
            assert whole["object"] == "chat.completion" and whole["model"] == "echo-http"
            assert whole["choices"][0]["message"] == {
                "role": "assistant",
                "content": "hello  brave world",
            }
            assert whole["choices"][0]["finish_reason"] == "stop"
            assert whole["usage"]["completion_tokens"] == 3

            streamed = chat_body("hello brave world", stream=True)
            streamed["stream_options"] = {"include_usage": True}
            async with http.post(CHAT, json=streamed) as r:
                assert r.headers["Content-Type"].startswith("text/event-stream")
                chunks = await events(r)
            deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
            assert deltas[0] == {"role": "assistant", "content": ""}
            assert [x.get("content") for x in deltas[1:]] == ["hello ", "brave ", "world", None]
            assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
            assert chunks[-1]["usage"]["total_tokens"] == 6

            async with http.post("/v1/completions", json={"prompt": "a b c", "max_tokens": 2}) as r:
                text = await r.json()
            assert text["choices"][0]["text"] == "a b " and text["choices"][0]["finish_reason"] == (
                "length"
            )
            async with http.post("/v1/embeddings", json={"input": ["hi", "there"]}) as r:
                vectors = await r.json()
            assert [v["embedding"] for v in vectors["data"]] == [embed("hi"), embed("there")]
            async with http.get("/v1/models") as r:
                assert [m["id"] for m in (await r.json())["data"]] == ["echo-http"]
            async with http.post(CHAT, data=b"{not json") as r:
                assert r.status == 400
                assert (await r.json())["error"]["message"] == "the request body is not valid JSON"
        assert backend.stdout[:2] == [f"POST {CHAT} 200", f"POST {CHAT} 200"]


async def test_metrics_show_waiting_and_running_and_a_disconnect_frees_the_slot() -> None:
    flags = ("--slots", "1", "--token-delay", "60")
    async with (
        running_backend(*flags, module=ECHO_HTTP) as backend,
        aiohttp.ClientSession(f"http://{backend.addr}") as http,
    ):
        holder = await http.post(CHAT, json=chat_body("a long answer", stream=True))
        first = await holder.content.readline()
        assert first.startswith(b"data: ")  # the role chunk: the request holds the slot
        # An empty answer needs no token delay, only the slot.
        queued = asyncio.ensure_future(http.post(CHAT, json=chat_body("")))
        async with asyncio.timeout(10):
            while True:
                async with http.get("/metrics") as r:
                    seen = gauges(await r.text())
                if seen["vllm:num_requests_waiting"] == 1:
                    break
        assert seen["vllm:num_requests_running"] == 1
        holder.close()  # the client goes away mid-stream
        async with asyncio.timeout(10):
            answer = await queued
            assert (await answer.json())["choices"][0]["message"]["content"] == ""
        async with http.get("/metrics") as r:
            after = gauges(await r.text())
        assert after["vllm:num_requests_running"] == after["vllm:num_requests_waiting"] == 0
        assert await backend.terminate() == 0
