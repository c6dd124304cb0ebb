"""The daemon's one lifecycle object: builds every component once, serves, shuts down.

Start order: registry (refuses a foreign or newer database), orphans of a
previous life stopped, catalog and settings loaded, gRPC listening, health
SERVING, then min_replicas started. Shutdown runs the same way backwards.
"""

import asyncio
import uuid
from pathlib import Path

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from modeld._proto.modeld.v1 import modeld_pb2, modeld_pb2_grpc
from modeld.api.servicer import ModelControl
from modeld.catalog import Catalog
from modeld.clock import Clock, SystemClock
from modeld.config import Config
from modeld.errors import ConfigError
from modeld.events import EventBus
from modeld.logstore import LogStore
from modeld.probe import ProbeCache
from modeld.registry import Registry
from modeld.router import Router
from modeld.settings_store import SettingsStore
from modeld.spec import ModelSpec
from modeld.supervisor.orphans import reap_orphans
from modeld.supervisor.process import ProcessSpawner, Spawner
from modeld.supervisor.replica import Replica, ReplicaDeps

log = structlog.get_logger(__name__)
SERVICE = modeld_pb2.DESCRIPTOR.services_by_name["ModelControl"].full_name


class Daemon:
    def __init__(self, config: Config, *, clock: Clock | None = None, spawner: Spawner | None = None):
        self.config = config
        self.clock = clock or SystemClock()
        self.spawner = spawner or ProcessSpawner()
        self.events = EventBus()
        self.logs = LogStore(
            self.clock,
            ring_lines=config.log_ring_lines,
            keep_stopped=config.log_keep_stopped,
            subscriber_queue=config.log_subscriber_queue,
        )
        self.health = HealthServicer()
        self.stopped = asyncio.Event()
        self._stop_requested = asyncio.Event()
        self._server: grpc.aio.Server | None = None
        self.registry: Registry | None = None
        self.router: Router | None = None

    async def start(self) -> None:
        cfg = self.config
        self.registry = registry = await Registry.open(cfg.db_path, synchronous=cfg.synchronous)
        handled = await reap_orphans(registry, node_id=cfg.node_id)
        if handled:
            log.info("orphans_cleaned", replicas=len(handled))
        catalog = Catalog(registry, cfg.backends, cfg.aliases, cfg.models)
        await catalog.load()
        settings = SettingsStore(registry, cfg.settings)
        await settings.load()
        self.router = router = self._build_router(catalog, settings)
        await self._serve_grpc(catalog, router, settings)
        router.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
        log.info("daemon_started", listen=list(cfg.listen), db=str(cfg.db_path), models=len(catalog.list()))

    def _build_router(self, catalog: Catalog, settings: SettingsStore) -> Router:
        assert self.registry is not None
        deps = ReplicaDeps(
            clock=self.clock,
            spawner=self.spawner,
            registry=self.registry,
            logs=self.logs,
            events=self.events,
            models_dir=self.config.models_dir,
            python=self.config.python,
            node_id=self.config.node_id,
        )

        def factory(spec: ModelSpec, gpu_ids: tuple[int, ...]) -> Replica:
            replica_id = f"{uuid.uuid4().hex[:12]}"
            return Replica(replica_id, spec, catalog.backend(spec.backend), deps, gpu_ids=gpu_ids)

        async def admit(spec: ModelSpec, deadline: float) -> tuple[int, ...]:
            return ()

        prober = ProbeCache(self.clock, lambda: settings.current.probe_ttl)
        return Router(
            clock=self.clock,
            catalog=catalog,
            settings=settings,
            events=self.events,
            factory=factory,
            admit=admit,
            prober=prober,
        )

    async def _serve_grpc(self, catalog: Catalog, router: Router, settings: SettingsStore) -> None:
        limit = self.config.max_message_bytes
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 0),
            ]
        )
        servicer = ModelControl(
            clock=self.clock,
            catalog=catalog,
            router=router,
            settings=settings,
            logs=self.logs,
            events=self.events,
        )
        modeld_pb2_grpc.add_ModelControlServicer_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
        sockets = [self._bind(server, address) for address in self.config.listen]
        await server.start()
        for path in sockets:
            path.chmod(self.config.socket_mode)
        self._server = server

    def _bind(self, server: grpc.aio.Server, address: str) -> Path | None:
        path = None
        if address.startswith("unix://"):
            path = Path(address.removeprefix("unix://"))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.unlink(missing_ok=True)
        try:
            port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise ConfigError(f"listen: cannot bind {address}: {exc}") from None
        if path is None and port == 0:
            raise ConfigError(f"listen: cannot bind {address} (in use, or not a valid host:port)")
        return path

    def request_stop(self) -> None:
        self._stop_requested.set()

    async def run_until_stopped(self) -> None:
        await self._stop_requested.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        log.info("daemon_stopping")
        await self.health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(self.config.shutdown_grace)
        if self.router is not None:
            await self.router.close()
        if self.registry is not None:
            await self.registry.close()
        for address in self.config.listen:
            if address.startswith("unix://"):
                Path(address.removeprefix("unix://")).unlink(missing_ok=True)
        log.info("daemon_stopped")
        self.stopped.set()

    def kill_backends(self) -> None:
        """Second signal: no grace for anyone, but still no orphans."""
        if self.router is None:
            return
        for replica in self.router.live_replicas():
            replica.kill()
        log.warning("backends_killed", replicas=len(self.router.live_replicas()))

