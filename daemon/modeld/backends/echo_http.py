"""The demo backend over HTTP: an OpenAI-style server that echoes, for `protocol = "http"`.

Run as `python -m modeld.backends.echo_http --addr HOST:PORT [flags]`. The demo
catalog serves it as model `echo-http`, so an HTTP backend, the client examples and
a gateway in front of modeld can all be tried with nothing downloaded. It answers:

- `POST /v1/chat/completions`: the last user message, echoed (`stream: true`: as
  server-sent events, one chunk per word, then `data: [DONE]`);
- `POST /v1/completions`: the prompt, echoed (streams the same way);
- `POST /v1/embeddings`: a deterministic 8-float vector per input (as the gRPC echo);
- `GET /v1/models`, `GET /health` (503 "Loading model" for `--load-delay`, then 200),
  `GET /metrics`: Prometheus text with vLLM's gauges `vllm:num_requests_running` and
  `vllm:num_requests_waiting` (requests past `--slots` wait for a slot).

Every request is printed on stdout ("POST /v1/chat/completions 200"), which the
daemon keeps in the replica's log. What an answer says is a function of the request, so
tests can compare them exactly.
"""

import argparse
import asyncio
import contextlib
import errno
import json
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from modeld.backends.echo import EXIT_ADDR_IN_USE, embed, seconds_since_process_start, split_addr

DEFAULT_MODEL = "echo-http"
DEFAULT_SLOTS = 4
# Whitespace at the start, then each word with the whitespace after it: joined, the text.
_PIECES = re.compile(r"^\s+|\S+\s*")
Json = dict[str, Any]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Flags:
    host: str
    port: int
    model: str = DEFAULT_MODEL
    slots: int = DEFAULT_SLOTS
    token_delay: float = 0.0
    load_delay: float = 0.0


def parse_flags(argv: list[str] | None = None) -> Flags:
    parser = argparse.ArgumentParser(
        prog="python -m modeld.backends.echo_http",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--addr", required=True, help="HOST:PORT to listen on (port 0: any)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the name /v1/models lists")
    parser.add_argument(
        "--slots",
        type=int,
        default=DEFAULT_SLOTS,
        help="requests answered at once; later ones wait (vllm:num_requests_waiting)",
    )
    parser.add_argument(
        "--token-delay",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="pause before each word of an answer (a slow model)",
    )
    parser.add_argument(
        "--load-delay",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="/health answers 503 for this long after the start (a model loading)",
    )
    ns = parser.parse_args(argv)
    try:
        host, port = split_addr(ns.addr)
    except ValueError as exc:
        parser.error(str(exc))
    if ns.slots < 1:
        parser.error("--slots must be at least 1")
    return Flags(host, port, ns.model, ns.slots, ns.token_delay, ns.load_delay)


class BadRequest(Exception):
    """A request OpenAI's API would refuse with 400; the message says what is wrong."""


def pieces(text: str) -> list[str]:
    """The chunks an answer streams in, one per word; joined they are `text`."""
    return _PIECES.findall(text)


def message_text(content: Any) -> str:
    """A chat message's content: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def chat_prompt(body: Json) -> str:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list")
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise BadRequest("'messages' has no message with role 'user' to echo")
    return message_text(users[-1].get("content"))


def completion_prompt(body: Json) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        return "".join(prompt)
    if not isinstance(prompt, str):
        raise BadRequest("'prompt' must be a string or a list of strings")
    return prompt


def embedding_inputs(body: Json) -> list[str]:
    given = body.get("input")
    inputs = [given] if isinstance(given, str) else given
    if not isinstance(inputs, list) or not inputs or not all(isinstance(i, str) for i in inputs):
        raise BadRequest("'input' must be a string or a non-empty list of strings")
    return inputs


def answer_pieces(prompt: str, body: Json) -> tuple[list[str], str]:
    """The answer's pieces, cut at `max_tokens` (finish reason "length"), else "stop"."""
    parts = pieces(prompt)
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is None:
        return parts, "stop"
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise BadRequest("'max_tokens' must be a positive integer")
    return (parts[:limit], "length") if len(parts) > limit else (parts, "stop")


def usage(prompt_tokens: int, completion_tokens: int) -> Json:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def error_body(message: str, kind: str = "invalid_request_error") -> Json:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


class Load:
    """The slots and the vLLM-style gauges that show how they are used."""

    def __init__(self, flags: Flags) -> None:
        # vLLM exposes no `_created` series; this process has no other metrics to keep them for.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry()
        labels = {"model_name": flags.model}
        running = Gauge("vllm:num_requests_running", "Requests answered now.", list(labels))
        waiting = Gauge("vllm:num_requests_waiting", "Requests waiting for a slot.", list(labels))
        finished = Counter(
            "vllm:request_success", "Requests answered in full.", [*labels, "finished_reason"]
        )
        for metric in (running, waiting, finished):
            self.registry.register(metric)
        self.running, self.waiting = running.labels(**labels), waiting.labels(**labels)
        self._finished, self._labels = finished, labels
        self._slots = asyncio.Semaphore(flags.slots)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        self.waiting.inc()
        try:
            await self._slots.acquire()
        finally:
            self.waiting.dec()
        self.running.inc()
        try:
            yield
        finally:
            self.running.dec()
            self._slots.release()

    def finished(self, reason: str) -> None:
        self._finished.labels(**self._labels, finished_reason=reason).inc()


class EchoHttp:
    """The handlers; one instance per process."""

    def __init__(self, flags: Flags, started: float) -> None:
        self._flags = flags
        self._ready_at = started + flags.load_delay
        self.load = Load(flags)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors_as_json])
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        return app

    @web.middleware
    async def _errors_as_json(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except BadRequest as exc:
            response = web.json_response(error_body(str(exc)), status=400)
        except web.HTTPException as exc:
            kind = "not_found_error" if exc.status == 404 else "invalid_request_error"
            response = web.json_response(error_body(exc.reason, kind), status=exc.status)
        print(f"{request.method} {request.path} {response.status}", flush=True)
        return response

    async def health(self, request: web.Request) -> web.Response:
        if time.monotonic() < self._ready_at:
            loading = {"error": {"code": 503, "message": "Loading model"}}
            return web.json_response(loading, status=503)
        return web.json_response({"status": "ok"})

    async def models(self, request: web.Request) -> web.Response:
        model = {"id": self._flags.model, "object": "model", "created": 0, "owned_by": "modeld"}
        return web.json_response({"object": "list", "data": [model]})

    async def metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.load.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await json_body(request)
        return await self._answer(request, body, chat_prompt(body), "chat.completion")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await json_body(request)
        return await self._answer(request, body, completion_prompt(body), "text_completion")

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        inputs = embedding_inputs(body)
        async with self.load.slot():
            data = [
                {"object": "embedding", "index": i, "embedding": embed(text)}
                for i, text in enumerate(inputs)
            ]
        tokens = sum(len(pieces(text)) for text in inputs)
        self.load.finished("stop")
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "model": self._model(body),
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    def _model(self, body: Json) -> str:
        model = body.get("model")
        return model if isinstance(model, str) and model else self._flags.model

    async def _answer(
        self, request: web.Request, body: Json, prompt: str, kind: str
    ) -> web.StreamResponse:
        parts, reason = answer_pieces(prompt, body)
        shape = Shape(kind, self._model(body), len(pieces(prompt)), len(parts))
        async with self.load.slot():
            if body.get("stream") is True:
                include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
                response = await self._stream(request, shape, parts, reason, include_usage)
            else:
                for _ in parts:
                    await self._pause()
                response = web.json_response(shape.whole("".join(parts), reason))
        self.load.finished(reason)
        return response

    async def _stream(
        self, request: web.Request, shape: "Shape", parts: list[str], reason: str, with_usage: bool
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        if shape.kind == "chat.completion":
            await send_event(response, shape.chunk({"role": "assistant", "content": ""}, None))
        for part in parts:
            await self._pause()
            await send_event(response, shape.chunk(part, None))
        await send_event(response, shape.chunk(None, reason))
        if with_usage:
            await send_event(response, shape.usage_chunk())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _pause(self) -> None:
        if self._flags.token_delay > 0:
            await asyncio.sleep(self._flags.token_delay)


@dataclass(frozen=True)
class Shape:
    """How one answer is written: a chat or a text completion, whole or in chunks."""

    kind: str  # "chat.completion" or "text_completion"
    model: str
    prompt_tokens: int
    completion_tokens: int

    @property
    def id(self) -> str:
        return ("chatcmpl-" if self.kind == "chat.completion" else "cmpl-") + "echo"

    def _head(self, kind: str) -> Json:
        return {"id": self.id, "object": kind, "created": int(time.time()), "model": self.model}

    def whole(self, text: str, reason: str) -> Json:
        if self.kind == "chat.completion":
            choice: Json = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text, "logprobs": None}
        choice["finish_reason"] = reason
        usage_ = usage(self.prompt_tokens, self.completion_tokens)
        return {**self._head(self.kind), "choices": [choice], "usage": usage_}

    def chunk(self, delta: Json | str | None, reason: str | None) -> Json:
        """One event: `delta` is a chat delta, a piece of text, or None for the last one."""
        if self.kind == "chat.completion":
            content: Json = delta if isinstance(delta, dict) else {}
            if isinstance(delta, str):
                content = {"content": delta}
            choice: Json = {"index": 0, "delta": content, "finish_reason": reason}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        text = delta if isinstance(delta, str) else ""
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self) -> Json:
        kind = "chat.completion.chunk" if self.kind == "chat.completion" else "text_completion"
        usage_ = usage(self.prompt_tokens, self.completion_tokens)
        return {**self._head(kind), "choices": [], "usage": usage_}


async def json_body(request: web.Request) -> Json:
    try:
        body = await request.json()
    except ValueError:
        raise BadRequest("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


async def send_event(response: web.StreamResponse, data: Json) -> None:
    await response.write(b"data: " + json.dumps(data).encode() + b"\n\n")


async def serve(flags: Flags) -> int:
    """Run the server until SIGTERM/SIGINT; returns the process exit code."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = EchoHttp(flags, time.monotonic())
    # No access log: the middleware prints one line per request in the backend's format.
    # Cancelling a handler whose client went away frees its slot at once, as servers do.
    runner = web.AppRunner(
        server.app(), access_log=None, handle_signals=False, handler_cancellation=True
    )
    await runner.setup()
    addr = f"{flags.host}:{flags.port}"
    try:
        site = web.TCPSite(runner, flags.host.strip("[]"), flags.port, reuse_port=False)
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        if exc.errno == errno.EADDRINUSE:
            print(f"address already in use: {addr}", file=sys.stderr, flush=True)
            return EXIT_ADDR_IN_USE
        print(f"cannot listen on {addr}: {exc.strerror}", file=sys.stderr, flush=True)
        return 1
    port = runner.addresses[0][1]
    startup_ms = seconds_since_process_start() * 1000
    print(
        f"echo_http listening addr={flags.host}:{port} startup_ms={startup_ms:.1f}",
        file=sys.stderr,
        flush=True,
    )
    await stop.wait()
    print("echo_http stopping", file=sys.stderr, flush=True)
    await runner.cleanup()
    return 0


def main(argv: list[str] | None = None) -> None:
    sys.exit(asyncio.run(serve(parse_flags(argv))))


if __name__ == "__main__":
    main()
