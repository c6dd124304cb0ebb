"""The daemon's one lifecycle object: builds every component once, serves, shuts down.

Start order: security settings checked, registry opened (a foreign or newer
database is refused), the containment mechanism chosen (`modeld serve` begins its
probe before the daemon's imports, and it is taken here), orphans of a previous
life stopped, the sentinel started (supervisor/containment.py), catalog and
settings loaded, gRPC listening, health SERVING, min_replicas started, then
READY=1 to systemd. Shutdown runs the same way backwards and stops every backend.
"""

import asyncio
import dataclasses
import uuid
from collections.abc import Coroutine
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from modeld._proto.modeld.v1 import modeld_pb2
from modeld.api.security import (
    OPEN_HEALTH,
    OPEN_REFLECTION,
    TokenAuth,
    check_listen_security,
    server_credentials,
    token_auth,
)
from modeld.api.servicer import ModelControl, add_to_server
from modeld.capacity.admission import Admission, Evictor
from modeld.capacity.releasing import Releasing
from modeld.capacity.resources import ResourceReader, make_reader
from modeld.capacity.watchdog import Watchdog
from modeld.clock import Clock, SystemClock
from modeld.config import Config
from modeld.config.secrets import load_tokens
from modeld.errors import ConfigError
from modeld.frontend import Frontend, LocalFrontend
from modeld.netaddr import why_unbindable
from modeld.ops.events import EventBus
from modeld.ops.logstore import LogStore
from modeld.ops.metrics import Metrics, MetricsServer
from modeld.ops.notify import Notifier
from modeld.ops.tasks import TaskSupervisor
from modeld.policy.backoff import BackoffPolicy
from modeld.policy.placement import unrunnable
from modeld.routing.leases import LeaseLimits
from modeld.routing.lifecycle import Admit, ScaleUps
from modeld.routing.observer import Observer
from modeld.routing.probe import ProbeCache
from modeld.routing.routed import Listener
from modeld.routing.router import Router, build_router
from modeld.spec import ModelSpec, with_file_estimate
from modeld.storage.catalog import Catalog
from modeld.storage.registry import Registry
from modeld.storage.settings_store import SettingsStore
from modeld.supervisor.containment import Containment, InstanceLock, Sentinel, choose
from modeld.supervisor.orphans import reap_orphans
from modeld.supervisor.ports import PortRange, ephemeral_overlap
from modeld.supervisor.process import ProcessSpawner, Spawner
from modeld.supervisor.replica import Replica, ReplicaDeps

if TYPE_CHECKING:
    from modeld.cluster.front import ClusterRouter

log = structlog.get_logger(__name__)
SERVICE = modeld_pb2.DESCRIPTOR.services_by_name["ModelControl"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class Daemon:
    def __init__(
        self,
        config: Config,
        *,
        clock: Clock | None = None,
        spawner: Spawner | None = None,
        reader: ResourceReader | None = None,
        containment: Future[Containment] | None = None,
    ) -> None:
        self.config = config
        # Begun by `modeld serve` before the daemon's imports (`choose_soon`); taken at
        # the point of the start where it would otherwise be chosen.
        self._chosen = containment
        # Checked before anything is opened, so a refusal leaves nothing to undo.
        self._creds, self._auth = self._security()
        self.clock = clock or SystemClock()
        self.spawner = spawner or ProcessSpawner()
        self.reader = reader or make_reader(config.resources_fake_path or None)
        self.releasing = Releasing(
            self.clock,
            self.reader.gpu_processes,
            timeout_s=config.resources_release_timeout,
        )
        self.notifier = Notifier.from_environ()
        self.metrics = Metrics()
        self.events = EventBus()
        self.logs = LogStore(
            self.clock,
            ring_lines=config.log_ring_lines,
            head_lines=config.log_head_lines,
            keep_stopped=config.log_keep_stopped,
            subscriber_queue=config.log_subscriber_queue,
            on_dropped=self.metrics.log_dropped,
        )
        self.health = HealthServicer()
        self._stop_requested = asyncio.Event()
        self._server: grpc.aio.Server | None = None
        self._servicer: ModelControl | None = None
        self._metrics_server: MetricsServer | None = None
        # Background tasks the daemon cannot work without; one that dies turns health
        # NOT_SERVING and stops feeding the systemd watchdog.
        self.tasks = TaskSupervisor(on_death=self._task_died)
        self._oneshots: set[asyncio.Future[None]] = set()
        self.registry: Registry | None = None
        self.router: Router | None = None
        self.watchdog: Watchdog | None = None
        self.containment: Containment | None = None
        self._sentinel: Sentinel | None = None
        self._lock: InstanceLock | None = None
        self.cluster: ClusterRouter | None = None
        # Cluster mode: the router's scale-outs, taken by the cluster's slot gate.
        self._scale_ups = ScaleUps() if config.cluster is not None else None

    async def start(self) -> None:
        catalog, settings = await self._open_state()
        self.router = router = self._build_router(catalog, settings)
        self.watchdog = self._build_watchdog(router, settings)
        front = await self._build_frontend(catalog, router, settings)
        await self._serve_grpc(catalog, router, settings, front)
        await self._serve_metrics(router)
        router.start()
        observer = Observer(self.events, router, self.metrics, self.notifier)
        self._spawn(observer.run(), "observer")
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "daemon_started",
            listen=list(self.config.listen),
            db=str(self.config.db_path),
            models=len(catalog.list()),
        )
        # The watchdog's tick tops up min_replicas too: it starts once they are up, so
        # the first starts have one starter.
        await self._start_min_replicas(router)
        self._spawn(self.watchdog.run(), "watchdog")
        self.notifier.ready()
        self.notifier.status(observer.summary())
        # Returns at once when systemd asked for no watchdog pings.
        self.tasks.spawn(
            self.notifier.watchdog_loop(self._responsive), "systemd-watchdog", forever=False
        )

    async def _open_state(self) -> tuple[Catalog, SettingsStore]:
        """The registry (after stopping what an earlier life left running), catalog, settings."""
        cfg = self.config
        self.registry = registry = await Registry.open(
            cfg.db_path, synchronous=cfg.synchronous, observe=self.metrics.transaction
        )
        # After the registry: a database refused as not ours leaves the directory untouched.
        self._lock = InstanceLock(cfg.state_dir)
        self.containment = containment = await self._choose_containment()
        handled = await reap_orphans(registry, node_id=cfg.node_id, containment=containment)
        self._sentinel = Sentinel(containment, cfg.python)
        log.info("containment", sentinel_pid=self._sentinel.pid, **containment.describe())
        if handled:
            log.info("orphans_cleaned", replicas=len(handled))
        catalog = Catalog(registry, cfg.backends, cfg.aliases, cfg.models)
        await catalog.load()
        warn_unrunnable(catalog.list(), self.reader)
        if overlap := ephemeral_overlap(cfg.backend_ports):
            log.warning("backend_ports_ephemeral", message=overlap)
        settings = SettingsStore(registry, cfg.settings)
        await settings.load()
        return catalog, settings

    async def _choose_containment(self) -> Containment:
        if self._chosen is not None:
            return await asyncio.wrap_future(self._chosen)
        cfg = self.config
        return await asyncio.to_thread(choose, cfg.state_dir, cfg.containment, cfg.cgroup_dir)

    def _responsive(self) -> bool:
        """False once a task the daemon cannot work without has died: systemd restarts us."""
        return self.tasks.healthy()

    def _task_died(self, name: str) -> None:
        self._spawn_once(self._not_serving(name))

    async def _not_serving(self, name: str) -> None:
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set("", not_serving)
        await self.health.set(SERVICE, not_serving)
        self.notifier.status(f"degraded: background task {name} died")

    def _spawn_once(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._oneshots.add(task)
        task.add_done_callback(self._oneshots.discard)

    def _security(self) -> tuple[grpc.ServerCredentials | None, TokenAuth | None]:
        cfg = self.config
        creds = server_credentials(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)
        auth = token_auth(
            cfg.auth_token_file,
            open_health=cfg.auth_open_health,
            open_reflection=cfg.auth_open_reflection,
        )
        if cfg.cluster is not None and cfg.cluster.token_file:
            # The cluster token lets other modelds in; it also makes tokens required here.
            tokens = load_tokens(cfg.cluster.token_file)
            if cfg.auth_token_file:
                tokens += load_tokens(cfg.auth_token_file)
            open_prefixes = [OPEN_HEALTH] * cfg.auth_open_health
            open_prefixes += [OPEN_REFLECTION] * cfg.auth_open_reflection
            auth = TokenAuth(tokens, open_prefixes)
        check_listen_security(
            cfg.listen,
            tls_enabled=creds is not None,
            token_enabled=auth is not None,
            allow_insecure_remote=cfg.allow_insecure_remote,
        )
        return creds, auth

    def _replica_deps(self) -> ReplicaDeps:
        """What every replica is built with."""
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
            containment=self.containment or Containment.marker_only(),
            on_released=self.releasing.add,
            ports=PortRange(*self.config.backend_ports),
        )
        if self.config.cluster is not None:
            # Route hands these addresses to clients on other hosts.
            deps = dataclasses.replace(deps, host=self.config.cluster.backend_host)
        return deps

    def _build_router(self, catalog: Catalog, settings: SettingsStore) -> Router:
        deps = self._replica_deps()
        models_dir = self.config.models_dir

        def factory(spec: ModelSpec, gpu_ids: tuple[int, ...], listener: Listener) -> Replica:
            backend = catalog.backend(spec.backend)
            spec = with_file_estimate(spec, models_dir)
            return Replica(
                uuid.uuid4().hex[:12], spec, backend, deps, gpu_ids=gpu_ids, listener=listener
            )

        def admission(evictor: Evictor) -> Admit:
            admit = Admission(
                clock=self.clock,
                reader=self.reader,
                settings=settings,
                evictor=evictor,
                releasing=self.releasing,
            ).admit

            async def estimated(spec: ModelSpec, deadline: float) -> tuple[int, ...]:
                return await admit(with_file_estimate(spec, models_dir), deadline)

            return estimated

        def backoff_policy(spec: ModelSpec) -> BackoffPolicy:
            return BackoffPolicy(crash_loop_window=catalog.backend(spec.backend).crash_loop_window)

        return build_router(
            clock=self.clock,
            catalog=catalog,
            settings=settings,
            events=self.events,
            factory=factory,
            admission=admission,
            prober=ProbeCache(self.clock, lambda: settings.current.probe_ttl),
            metrics=self.metrics,
            limits=LeaseLimits(self.config.max_leases_per_replica, self.config.max_leases),
            tasks=self.tasks,
            backoff_policy=backoff_policy,
            gate=self._scale_ups,
        )

    def _build_watchdog(self, router: Router, settings: SettingsStore) -> Watchdog:
        return Watchdog(
            clock=self.clock,
            reader=self.reader,
            settings=settings,
            views=router.views,
            observe=router.observe,
            evict=router.evict,
            maintain=router.maintain if self._keeps_min_replicas else list,
            events=self.events,
        )

    @property
    def _keeps_min_replicas(self) -> bool:
        """In a cluster, min_replicas counts the whole cluster and only its leader keeps
        it (cluster/leader.py); a host keeping its own count too would fight it."""
        return self.config.cluster is None

    async def _start_min_replicas(self, router: Router) -> None:
        starts = router.maintain() if self._keeps_min_replicas else []
        if starts:
            log.info("min_replicas_starting", replicas=len(starts))
            await asyncio.wait(starts)

    async def _serve_grpc(
        self,
        catalog: Catalog,
        router: Router,
        settings: SettingsStore,
        front: Frontend,
    ) -> None:
        creds, auth = self._creds, self._auth
        limit = self.config.max_message_bytes
        server = grpc.aio.server(
            interceptors=[auth] if auth else None,
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 0),
            ],
        )
        servicer = ModelControl(
            clock=self.clock,
            catalog=catalog,
            router=router,
            settings=settings,
            logs=self.logs,
            events=self.events,
            metrics=self.metrics,
            front=front,
            on_settings=self.watchdog.poke if self.watchdog else None,
        )
        add_to_server(servicer, server)
        self._servicer = servicer
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME), server
        )
        sockets = [self._bind(server, address, creds) for address in self.config.listen]
        await server.start()
        for path in sockets:
            if path is not None:
                path.chmod(self.config.socket_mode)
        self._server = server

    def _bind(
        self, server: grpc.aio.Server, address: str, creds: grpc.ServerCredentials | None
    ) -> Path | None:
        path = None
        if address.startswith("unix://"):
            path = Path(address.removeprefix("unix://"))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.unlink(missing_ok=True)
        try:
            if creds is not None and path is None:
                port = server.add_secure_port(address, creds)
            else:
                port = server.add_insecure_port(address)
        except RuntimeError as exc:
            why = why_unbindable(address) or str(exc)
            raise ConfigError(f"listen: cannot bind {address}: {why}") from None
        if path is None and port == 0:
            raise ConfigError(f"listen: cannot bind {address} (in use, or not a valid host:port)")
        return path

    async def _build_frontend(
        self, catalog: Catalog, router: Router, settings: SettingsStore
    ) -> Frontend:
        """What the API routes through: this host's router alone, or the cluster's."""
        if self.config.cluster is None:
            return LocalFrontend(router, catalog)
        # Imported here: the cluster (and its PostgreSQL driver) is start-up time
        # and memory a single host does not spend.
        from modeld.cluster.front import ClusterRouter
        from modeld.cluster.hostcap import LocalFigures

        figures = LocalFigures(
            [*self.config.backends, *self.config.aliases],
            self.reader,
            router.views,
            lambda: settings.current.max_loaded,
            self.clock,
        )
        assert self._scale_ups is not None  # built with the cluster config
        self.cluster = ClusterRouter(
            self.config,
            router,
            self.clock,
            self.events,
            catalog=catalog,
            figures=figures.read,
            spawn=self.tasks.spawn,
            scale_ups=self._scale_ups,
        )
        await self.cluster.start()
        return self.cluster

    async def _serve_metrics(self, router: Router) -> None:
        self.metrics.set_sources(
            replicas=router.index.state_counts,
            in_flight=router.index.in_flight_counts,
            queued=router.queues.lengths,
        )
        if self.cluster is not None:
            self.metrics.set_cluster_source(self.cluster.stats)
        self.metrics.set_backend_load_source(router.backend_loads)
        if self.config.metrics_listen:
            self._metrics_server = MetricsServer(self.metrics, self.config.metrics_listen)
            await self._metrics_server.start()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        self.tasks.spawn(coro, name)

    def request_stop(self) -> None:
        self._stop_requested.set()

    async def run_until_stopped(self) -> None:
        await self._stop_requested.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        log.info("daemon_stopping")
        self.tasks.stopping()
        self.notifier.stopping()
        await self.health.enter_graceful_shutdown()
        self.events.close_all()
        self.logs.close_all()
        if self._servicer is not None:
            self._servicer.close()
        if self._server is not None:
            await self._server.stop(self.config.shutdown_grace)
        await self.tasks.close()
        if self.cluster is not None:
            await self.cluster.close()
        if self.watchdog is not None:
            await self.watchdog.close()
        if self.router is not None:
            await self.router.close()
        if self._metrics_server is not None:
            await self._metrics_server.close()
        if self._sentinel is not None:
            await self._sentinel.close()
        if self.containment is not None:
            self.containment.close()
        if self.registry is not None:
            await self.registry.close()
        if self._server is not None:
            # Only sockets this daemon bound: a start refused for a busy state_dir
            # must not delete the running daemon's socket.
            _remove_sockets(self.config.listen)
        if self._lock is not None:
            self._lock.release()
        self.notifier.close()
        log.info("daemon_stopped")

    def kill_backends(self) -> None:
        """Second signal: no grace for anyone, but still no orphans."""
        if self.router is None:
            return
        live = self.router.live_replicas()
        for replica in live:
            replica.kill()
        log.warning("backends_killed", replicas=len(live))


def _remove_sockets(listen: tuple[str, ...]) -> None:
    for address in listen:
        if address.startswith("unix://"):
            Path(address.removeprefix("unix://")).unlink(missing_ok=True)


def warn_unrunnable(specs: list[ModelSpec], reader: ResourceReader) -> None:
    """A model asking for GPUs this host lacks is refused at each load; say so at start."""
    try:
        gpus = reader.read().gpus
    except ValueError:
        return  # a bad fake resources file: the first load reports it
    if refused := unrunnable(specs, gpus):
        log.warning("models_cannot_run_here", models=refused)
