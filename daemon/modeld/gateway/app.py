"""The gateway's HTTP application: its routes, the edge (keys, errors, counts), and `serve`.

- `POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings` and any other
  `POST /v1/*`: routed by the body's `model` and forwarded (`proxy`);
- `GET /v1/models`: modeld's models of protocol `http`, in OpenAI's list format;
- `GET /health`: the gateway and its daemon; `GET /metrics`: Prometheus text.

With `api_keys_file` set, every `/v1/*` request needs `Authorization: Bearer <key>`;
`/health` and `/metrics` stay open (they say nothing about the models' answers).
"""

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
import structlog
from aiohttp import web

from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld.client import AsyncClient
from modeld.client.errors import from_rpc
from modeld.config.gateway import GatewayConfig
from modeld.gateway import errors
from modeld.gateway.auth import Keys
from modeld.gateway.leasing import Leases, affinity_key
from modeld.gateway.metrics import Metrics, endpoint
from modeld.gateway.proxy import Call, Proxy
from modeld.gateway.upstream import Upstream, forwarded, skipped

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
HEALTH_TIMEOUT_S = 5.0
SESSION_HEADER = "X-Session-Id"


def parse_body(body: bytes) -> tuple[str, object]:
    """The `model` and `user` of a request body (nothing else of it is decoded for routing)."""
    try:
        doc = json.loads(body)
    except ValueError:
        raise errors.bad_request("the request body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise errors.bad_request("the request body must be a JSON object")
    model = doc.get("model")
    if not isinstance(model, str) or not model:
        raise errors.bad_request(
            'the request names no model: set "model" to one that GET /v1/models lists',
            "model_required",
        )
    return model, doc.get("user")


class Gateway:
    def __init__(self, cfg: GatewayConfig, clients: Sequence[AsyncClient], keys: Keys) -> None:
        """`clients`: connections to one modeld, each with its RouteStream (see leasing)."""
        self._cfg = cfg
        self._client = clients[0]
        self._keys = keys
        # With keys on, the client's key is the gateway's secret: the replica never sees it.
        self._skip = skipped(frozenset({"authorization"}) if keys.required else frozenset())
        self.metrics = Metrics()
        self.leases = Leases(clients)
        self.upstream = Upstream(cfg.connect_timeout, cfg.max_connections_per_replica)
        self.proxy = Proxy(self.leases, self.upstream, self.metrics, cfg.retry_after)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._edge], client_max_size=self._cfg.max_body_bytes)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/{tail:.+}", self.infer)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics_page)
        return app

    async def close(self) -> None:
        await self.leases.close()
        await self.upstream.close()

    @web.middleware
    async def _edge(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.metrics.in_flight.inc()
        try:
            response = await self._answer(request, handler)
        finally:
            self.metrics.in_flight.dec()
        self.metrics.answered(endpoint(request.path), response.status)
        return response

    async def _answer(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            if request.path.startswith("/v1/") and not self._keys.allows(
                request.headers.get("Authorization")
            ):
                raise errors.ApiError(
                    401, "an API key is required: send 'Authorization: Bearer <key>'",
                    errors.INVALID, "invalid_api_key", {"WWW-Authenticate": "Bearer"},
                )  # fmt: skip
            return await handler(request)
        except errors.ApiError as exc:
            error = exc
        except web.HTTPException as exc:
            error = errors.http_error(exc)
        self.metrics.errors.labels(code=error.code or "error").inc()
        return error.response()

    async def infer(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        body = await request.read()
        model, user = parse_body(body)
        call = Call(
            model=model,
            affinity_key=affinity_key(request.headers.get(SESSION_HEADER), user),
            method=request.method,
            path_qs=request.path_qs,
            body=body,
            headers=forwarded(request.headers, self._skip),
            endpoint=endpoint(request.path),
            started=started,
        )
        return await self.proxy.serve(request, call)

    async def models(self, request: web.Request) -> web.Response:
        options = {"metadata": self._client.metadata, "timeout": HEALTH_TIMEOUT_S}
        try:
            specs, backends = await asyncio.gather(
                self._client.stub.ListModels(pb.ListModelsRequest(), **options),
                self._client.stub.ListBackends(pb.ListBackendsRequest(), **options),
            )
        except grpc.RpcError as exc:
            raise errors.from_modeld(
                from_rpc(exc, self._client.addr), "", self._cfg.retry_after
            ) from None
        http = {b.name for b in backends.backends if b.protocol == pb.HTTP}
        http |= {a for b in backends.backends if b.protocol == pb.HTTP for a in b.aliases}
        data = [_model_entry(m.name) for m in specs.models if m.backend in http]
        return web.json_response({"object": "list", "data": data})

    async def health(self, request: web.Request) -> web.Response:
        try:
            await self._client.stub.Ping(
                pb.PingRequest(), metadata=self._client.metadata, timeout=HEALTH_TIMEOUT_S
            )
        except grpc.RpcError as exc:
            why = from_rpc(exc, self._client.addr).message
            body = {"status": "unavailable", "gateway": "ok", "modeld": why}
            return web.json_response(body, status=503)
        return web.json_response({"status": "ok", "gateway": "ok", "modeld": "ok"})

    async def metrics_page(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.metrics.render(), headers={"Content-Type": self.metrics.content_type}
        )


def _model_entry(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "modeld"}
