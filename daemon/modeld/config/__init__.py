"""The daemon's configuration: one frozen object built once.

Sources, later ones winning: the embedded defaults, the TOML file (`--config`),
`MODELD_*` environment variables, then command-line flags. Every key is parsed
by the schema below; an unknown key or a bad value is a ConfigError naming it.
"""

import json
import os
import re
import socket
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from modeld.config import gateway as gateway_config
from modeld.config.models import DEMO_CATALOG, build_models
from modeld.config.values import Parser
from modeld.config.values import boolean as _bool
from modeld.config.values import check_config_name as _check_config_name
from modeld.config.values import choice as _choice
from modeld.config.values import file_mode as _mode
from modeld.config.values import integer as _int
from modeld.config.values import number as _float
from modeld.config.values import parse_table as _parse_table
from modeld.config.values import port_range as _port_range
from modeld.config.values import str_list as _str_list
from modeld.config.values import str_map as _str_map
from modeld.config.values import text as _str
from modeld.errors import ConfigError, InvalidArgument
from modeld.netaddr import split_host_port
from modeld.spec import (
    LOAD_METRICS,
    PLACEHOLDERS,
    PLACEMENTS,
    BackendSpec,
    ModelSpec,
    Settings,
    check_settings,
)
from modeld.units import parse_duration

# Bounds on leases (`[leases]`): a client that never releases cannot grow the table forever.
DEFAULT_MAX_LEASES_PER_REPLICA = 10_000
DEFAULT_MAX_LEASES = 100_000
# Where backends listen: below Linux's default ephemeral range (32768-60999), so no
# outgoing connection takes a backend's port (supervisor/ports.py).
DEFAULT_BACKEND_PORTS = (20000, 29999)

TOP: dict[str, Parser] = {
    "listen": _str_list,
    "state_dir": _str,
    "models_dir": _str,
    "log_level": _choice("debug", "info", "warning", "error"),
    "log_format": _choice("auto", "json", "console"),
    "socket_mode": _mode,
    "synchronous": _choice("off", "normal", "full", "extra"),
    "node_id": _str,
    "shutdown_grace": parse_duration,
    "max_message_bytes": _int,
    "metrics_listen": _str,
    "tls_cert": _str,
    "tls_key": _str,
    "tls_client_ca": _str,
    "auth_token_file": _str,
    "auth_open_health": _bool,
    "auth_open_reflection": _bool,
    "allow_insecure_remote": _bool,
    "containment": _choice("auto", "cgroup", "marker"),
    "cgroup_dir": _str,
    "backend_ports": _port_range,
}
TABLES: dict[str, dict[str, Parser]] = {
    "watchdog": {
        "busy_timeout": parse_duration,
        "idle_timeout": parse_duration,
        "max_loaded": _int,
        "memory_threshold": _float,
        "force_eviction_when_busy": _bool,
        "watchdog_interval": parse_duration,
    },
    "routing": {
        "lease_ttl": parse_duration,
        "probe_ttl": parse_duration,
        "affinity_slack": _float,
    },
    "logs": {
        "ring_lines": _int,
        "head_lines": _int,
        "keep_stopped": _int,
        "subscriber_queue": _int,
    },
    "leases": {"max_per_replica": _int, "max_total": _int},
    "resources": {"fake_path": _str, "release_timeout": parse_duration},
    "cluster": {
        "dsn": _str,
        "dsn_file": _str,
        "host_id": _str,
        "advertise": _str,
        "backend_host": _str,
        "labels": _str_map,
        "host_ttl": parse_duration,
        "role": _choice("node", "router"),
        "placement": _choice(*PLACEMENTS),
        "token_file": _str,
        "allow_insecure_remote": _bool,
    },
    "gateway": gateway_config.KEYS,
}
BACKEND_KEYS: dict[str, Parser] = {
    "command": _str_list,
    "protocol": _choice("grpc", "http"),
    "health_path": _str,
    "env": _str_map,
    "workdir": _str,
    "python": _str,
    "aliases": _str_list,
    "ready_timeout": parse_duration,
    "ready_ceiling": parse_duration,
    "stop_grace": parse_duration,
    "max_output_line": _int,
    "start_attempts": _int,
    "crash_loop_window": parse_duration,
    "probe_timeout": parse_duration,
    "probe_failures": _int,
    "probe_window": parse_duration,
    "load_metrics": _choice(*LOAD_METRICS),
    "metrics_path": _str,
    "load_interval": parse_duration,
    "saturation_waiting": _int,
}
DEFAULTS: dict[str, Any] = {
    "listen": ["127.0.0.1:50051"],
    "state_dir": "./var",
    "models_dir": "./var/models",
    "log_level": "info",
    "log_format": "auto",
    "socket_mode": "0660",
    "synchronous": "normal",
    "node_id": "local",
    "shutdown_grace": "10s",
    "max_message_bytes": 4 * 1024 * 1024,
    "metrics_listen": "",
    "tls_cert": "",
    "tls_key": "",
    "tls_client_ca": "",
    "auth_token_file": "",
    "auth_open_health": True,
    "auth_open_reflection": False,
    "allow_insecure_remote": False,
    "containment": "auto",
    "cgroup_dir": "",
    "backend_ports": "-".join(str(p) for p in DEFAULT_BACKEND_PORTS),
}
_SECURITY_KEYS = (
    "metrics_listen",
    "tls_cert",
    "tls_key",
    "tls_client_ca",
    "auth_token_file",
    "auth_open_health",
    "auth_open_reflection",
    "allow_insecure_remote",
)
# Environment variables the client verbs read; not config keys.
CLIENT_ENV = frozenset({"MODELD_ADDR", "MODELD_CONFIG", "MODELD_TOKEN_FILE"})
# Read by the test suite (PostgreSQL and network namespaces for the cluster tests, the
# real servers' cache for `make test-real`); not config keys either.
TEST_ENV = frozenset(
    {
        "MODELD_TEST_PG_DSN",
        "MODELD_REQUIRE_POSTGRES",
        "MODELD_REQUIRE_NETNS",
        "MODELD_REAL_CACHE",
        "MODELD_REAL_LLAMA_SERVER",
    }
)


@dataclass(frozen=True)
class ClusterConfig:
    """`[cluster]`: this host joins others through one PostgreSQL (see modeld.cluster)."""

    dsn: str = field(repr=False)
    dsn_file: str
    host_id: str
    advertise: str
    backend_host: str
    labels: tuple[tuple[str, str], ...] = ()
    host_ttl: float = 10.0
    role: str = "node"
    # How replicas of one model go over hosts unless its spec says (spec.PLACEMENTS).
    placement: str = "spread"
    token_file: str = ""
    allow_insecure_remote: bool = False

    def redacted(self) -> dict[str, Any]:
        out = asdict(self)
        out["dsn"] = redact_dsn(self.dsn)
        out["labels"] = dict(self.labels)
        return out


def redact_dsn(dsn: str) -> str:
    """A DSN with any password replaced, for logs and `config show`."""
    dsn = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", dsn)
    return re.sub(r"(password\s*=\s*)(\S+)", r"\1***", dsn, flags=re.IGNORECASE)


@dataclass(frozen=True)
class Config:
    listen: tuple[str, ...]
    state_dir: Path
    models_dir: Path
    log_level: str
    log_format: str
    socket_mode: int
    synchronous: str
    node_id: str
    shutdown_grace: float
    max_message_bytes: int
    settings: Settings
    backends: Mapping[str, BackendSpec]
    aliases: Mapping[str, str]
    models: Mapping[str, ModelSpec]
    log_ring_lines: int = 1000
    log_head_lines: int = 300
    log_keep_stopped: int = 5
    log_subscriber_queue: int = 1000
    max_leases_per_replica: int = DEFAULT_MAX_LEASES_PER_REPLICA
    max_leases: int = DEFAULT_MAX_LEASES
    resources_fake_path: str = ""
    resources_release_timeout: float = 30.0
    metrics_listen: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    auth_token_file: str = ""
    auth_open_health: bool = True
    auth_open_reflection: bool = False
    allow_insecure_remote: bool = False
    containment: str = "auto"
    cgroup_dir: str = ""
    backend_ports: tuple[int, int] = DEFAULT_BACKEND_PORTS
    cluster: ClusterConfig | None = None
    gateway: gateway_config.GatewayConfig = field(default_factory=gateway_config.GatewayConfig)
    python: str = sys.executable
    source: str = "defaults"

    @property
    def db_path(self) -> Path:
        return self.state_dir / "modeld.db"

    def backend(self, name: str) -> BackendSpec | None:
        """A catalog entry by name or alias."""
        return self.backends.get(self.aliases.get(name, name))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["state_dir"] = str(self.state_dir)
        out["models_dir"] = str(self.models_dir)
        out["socket_mode"] = oct(self.socket_mode)
        out["backends"] = {n: asdict(b) for n, b in self.backends.items()}
        out["models"] = {n: m.to_dict() for n, m in self.models.items()}
        out["aliases"] = dict(self.aliases)
        out["cluster"] = self.cluster.redacted() if self.cluster else None
        return out

    def show(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)


def load(
    path: str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the one Config: defaults, then the file, then env, then CLI overrides."""
    env = os.environ if env is None else env
    path = path or env.get("MODELD_CONFIG") or None
    raw: dict[str, Any] = dict(DEFAULTS)
    file_raw = _read_file(path) if path else {}
    # The demo backends stay until the file has backends of its own, so a first
    # [models.NAME] may use them; the demo models only while the file has neither.
    if "backends" not in file_raw:
        raw["backends"] = DEMO_CATALOG["backends"]
        if "models" not in file_raw:
            raw["models"] = DEMO_CATALOG["models"]
    raw.update(file_raw)
    _apply_env(raw, env)
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value)
    return _build(raw, source=path or "defaults")


def _read_file(path: str) -> dict[str, Any]:
    try:
        with Path(path).open("rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: invalid TOML: {exc}") from exc


def env_names() -> dict[str, str]:
    """Every MODELD_* variable the daemon reads, mapped to its dotted config key."""
    names = {f"MODELD_{key.upper()}": key for key in TOP}
    for table, keys in TABLES.items():
        names.update({f"MODELD_{table.upper()}_{key.upper()}": f"{table}.{key}" for key in keys})
    return names


def _apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> None:
    known = env_names()
    for name, value in env.items():
        if not name.startswith("MODELD_") or name in CLIENT_ENV or name in TEST_ENV:
            continue
        if name not in known:
            raise ConfigError(f"environment variable {name}: unknown modeld setting")
        _set_dotted(raw, known[name], value)


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    table, _, leaf = key.rpartition(".")
    target = raw.setdefault(table, {}) if table else raw
    target[leaf] = value


def _refuse_removed(raw: dict[str, Any]) -> None:
    routing = raw.get("routing")
    if isinstance(routing, dict) and "scale_up_in_flight" in routing:
        raise ConfigError(
            "config: routing.scale_up_in_flight is gone: set `parallel` on the model instead "
            "(the leases one replica may hold); a Route that finds every replica at `parallel` "
            "starts one more, up to max_replicas"
        )


def _build(raw: dict[str, Any], source: str) -> Config:
    tables = {"backends", "models", *TABLES}
    _refuse_removed(raw)
    top = _parse_table("", {k: v for k, v in raw.items() if k not in tables}, TOP)
    parsed = {t: _parse_table(t, raw.get(t, {}), TABLES[t]) for t in TABLES}
    backends, aliases = _build_backends(raw.get("backends", {}))
    models = build_models(raw.get("models", {}), backends, aliases)
    try:
        settings = check_settings(Settings(**parsed["watchdog"], **parsed["routing"]))
    except InvalidArgument as exc:
        raise ConfigError(f"config: {exc}") from None
    logs = parsed["logs"]
    head_lines = logs.pop("head_lines", 300)
    if not 0 <= head_lines <= 100_000:
        raise ConfigError(f"config: logs.head_lines: expected 0..100000, got {head_lines}")
    _check_positive(logs)
    leases = parsed["leases"]
    for key, value in leases.items():
        if not 1 <= value <= 10_000_000:
            raise ConfigError(f"config: leases.{key}: expected 1..10000000, got {value}")
    if not top.get("listen"):
        raise ConfigError("config: listen: at least one address is needed")
    return Config(
        listen=top["listen"],
        state_dir=Path(top["state_dir"]),
        models_dir=Path(top["models_dir"]),
        log_level=top["log_level"],
        log_format=top["log_format"],
        socket_mode=top["socket_mode"],
        synchronous=top["synchronous"].upper(),
        node_id=top["node_id"],
        shutdown_grace=top["shutdown_grace"],
        max_message_bytes=top["max_message_bytes"],
        settings=settings,
        backends=backends,
        aliases=aliases,
        models=models,
        log_ring_lines=logs.get("ring_lines", 1000),
        log_head_lines=head_lines,
        log_keep_stopped=logs.get("keep_stopped", 5),
        log_subscriber_queue=logs.get("subscriber_queue", 1000),
        max_leases_per_replica=leases.get("max_per_replica", DEFAULT_MAX_LEASES_PER_REPLICA),
        max_leases=leases.get("max_total", DEFAULT_MAX_LEASES),
        resources_fake_path=parsed["resources"].get("fake_path", ""),
        resources_release_timeout=parsed["resources"].get("release_timeout", 30.0),
        containment=top["containment"],
        cgroup_dir=top["cgroup_dir"],
        backend_ports=top["backend_ports"],
        cluster=_build_cluster(raw.get("cluster"), parsed["cluster"], top["listen"]),
        gateway=gateway_config.build(parsed["gateway"]),
        source=source,
        **{key: top[key] for key in _SECURITY_KEYS},
    )


def _build_cluster(
    present: Any, values: dict[str, Any], listen: tuple[str, ...]
) -> ClusterConfig | None:
    if present is None:
        return None
    if bool(values.get("dsn")) == bool(values.get("dsn_file")):
        raise ConfigError("config: cluster: set exactly one of cluster.dsn and cluster.dsn_file")
    host_id = values.get("host_id") or socket.gethostname()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", host_id):
        raise ConfigError(
            f"config: cluster.host_id: {host_id!r} must be 1-63 of A-Z a-z 0-9 . _ - "
            "(the hostname is the default)"
        )
    advertise = values.get("advertise") or next((a for a in listen if not a.startswith("unix")), "")
    try:
        host, _ = split_host_port(advertise)
    except ValueError as exc:
        raise ConfigError(f"config: cluster.advertise: {exc}") from None
    if not host or host in ("0.0.0.0", "::"):
        raise ConfigError(
            f"config: cluster.advertise: {advertise!r} is not an address other hosts can reach"
        )
    ttl = values.get("host_ttl", 10.0)
    if not 1.0 <= ttl <= 3600.0:
        raise ConfigError("config: cluster.host_ttl: expected 1s..1h")
    return ClusterConfig(
        dsn=values.get("dsn", ""),
        dsn_file=values.get("dsn_file", ""),
        host_id=host_id,
        advertise=advertise,
        backend_host=values.get("backend_host") or host,
        labels=values.get("labels", ()),
        host_ttl=ttl,
        role=values.get("role", "node"),
        placement=values.get("placement", "spread"),
        token_file=values.get("token_file", ""),
        allow_insecure_remote=values.get("allow_insecure_remote", False),
    )


def _check_positive(logs: Mapping[str, int]) -> None:
    for key, value in logs.items():
        if not 1 <= value <= 1_000_000:
            raise ConfigError(f"config: logs.{key}: expected 1..1000000, got {value}")


def _build_backends(data: Any) -> tuple[dict[str, BackendSpec], dict[str, str]]:
    if not isinstance(data, dict):
        raise ConfigError("config: backends: expected a table of [backends.NAME] tables")
    backends: dict[str, BackendSpec] = {}
    aliases: dict[str, str] = {}
    for name, table in data.items():
        where = f"backends.{name}"
        _check_config_name(where, "backend", name)
        values = _parse_table(where, table, BACKEND_KEYS)
        if not values.get("command"):
            raise ConfigError(f"config: {where}.command: a non-empty argv list is required")
        check_placeholders(f"{where}.command", values["command"])
        if values.get("protocol") == "http" and not str(
            values.get("health_path", "/health")
        ).startswith("/"):
            raise ConfigError(f"config: {where}.health_path: must start with '/'")
        for alias in values.get("aliases", ()):
            _check_config_name(f"{where}.aliases", "backend alias", alias)
            if alias in data or alias in aliases:
                raise ConfigError(f"config: {where}.aliases: {alias!r} is already a backend name")
            aliases[alias] = name
        _check_backend_limits(where, values)
        _check_load_metrics(where, values)
        backends[name] = BackendSpec(name=name, **values)
    return backends, aliases


def check_placeholders(where: str, command: tuple[str, ...]) -> None:
    """Every `{name}` in a backend's command must be one modeld fills in (launch.py)."""
    for arg in command:
        for name in re.findall(r"\{([A-Za-z_]\w*)\}", arg):
            if name not in PLACEHOLDERS:
                known = ", ".join(f"{{{p}}}" for p in PLACEHOLDERS)
                raise ConfigError(
                    f"config: {where}: unknown placeholder {{{name}}}; known: {known}"
                )


def _check_backend_limits(where: str, values: Mapping[str, Any]) -> None:
    if values.get("python") and not Path(values["python"]).is_absolute():
        raise ConfigError(
            f"config: {where}.python: must be an absolute path to an interpreter "
            "(e.g. /opt/venvs/NAME/bin/python)"
        )
    if not 1 <= values.get("start_attempts", 3) <= 10:
        raise ConfigError(f"config: {where}.start_attempts: expected 1..10")
    if not 256 <= values.get("max_output_line", 8192) <= 1 << 20:
        raise ConfigError(f"config: {where}.max_output_line: expected 256..1048576")
    if values.get("ready_timeout", 60.0) <= 0:
        raise ConfigError(f"config: {where}.ready_timeout: must be positive")
    if not 0 <= values.get("crash_loop_window", 30.0) <= 86400:
        raise ConfigError(f"config: {where}.crash_loop_window: expected 0..24h")
    if not 0 < values.get("probe_timeout", 1.0) <= 600:
        raise ConfigError(f"config: {where}.probe_timeout: expected more than 0, at most 10m")
    if not 1 <= values.get("probe_failures", 3) <= 100:
        raise ConfigError(f"config: {where}.probe_failures: expected 1..100")
    if not 0 <= values.get("probe_window", 10.0) <= 86400:
        raise ConfigError(f"config: {where}.probe_window: expected 0..24h")


def _check_load_metrics(where: str, values: Mapping[str, Any]) -> None:
    if values.get("load_metrics", "none") != "none" and values.get("protocol") != "http":
        raise ConfigError(
            f"config: {where}.load_metrics: only an http backend serves metrics "
            '(set protocol = "http", or load_metrics = "none")'
        )
    if not str(values.get("metrics_path", "/metrics")).startswith("/"):
        raise ConfigError(f"config: {where}.metrics_path: must start with '/'")
    if not 0.05 <= values.get("load_interval", 1.0) <= 3600:
        raise ConfigError(f"config: {where}.load_interval: expected 50ms..1h")
    if not 0 <= values.get("saturation_waiting", 5) <= 1_000_000:
        raise ConfigError(f"config: {where}.saturation_waiting: expected 0..1000000")
