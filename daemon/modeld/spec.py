"""The daemon's vocabulary as immutable values: backends, model specs, settings.

Everything here is validated on construction paths (config, API) through the
functions below, so the rest of the daemon can trust a spec it is handed.
"""

import re
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

from modeld import load_options
from modeld.errors import FailedPrecondition, InvalidArgument

Protocol = Literal["grpc", "http"]
PROTOCOLS: tuple[Protocol, ...] = ("grpc", "http")
# How the replicas of one model are laid over the hosts of a cluster ("" in a spec:
# the cluster's `[cluster] placement`).
PLACEMENTS = ("spread", "binpack")
# Whose Prometheus gauges an http backend's `load_metrics` reads (policy/load.py).
LOAD_METRICS = ("vllm", "sglang", "llamacpp", "none")

# Limits on what a spec may hold (README "Limits"): a request can never make the
# daemon store or log an unbounded amount, and every value is checked on the way in.
MAX_NAME_LEN = 128
MAX_OPTIONS = 128
MAX_OPTION_LEN = 4096
# All keys and values of one spec together: keeps a spec (and ListModels) small.
MAX_OPTIONS_BYTES = 16384
MAX_GROUPS = 16
MAX_HOST_LABELS = 16
MAX_LABEL_LEN = 128
MAX_REPLICAS = 64
# Leases one replica may hold at once (`parallel`), and Routes one model's queue may hold.
MAX_PARALLEL = 1 << 16
MAX_QUEUE = 1 << 16
DEFAULT_QUEUE_MAX = 512
MIN_LEASE_TTL_S = 0.1
MAX_PATH_LEN = 1024
MAX_TTL_S = 365 * 86400
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/+-]*")
# Option keys become "key:value" LoadModel entries: no '=', ':', spaces or controls.
_OPTION_KEY_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
# Host label names and values: printable, no spaces, so they read well in `modeld hosts`.
_LABEL_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./:-]*")


def check_name(kind: str, name: str) -> str:
    """Reject names that are empty, too long, or could be mistaken for something else."""
    if not name:
        raise InvalidArgument(f"{kind} name is empty")
    if len(name) > MAX_NAME_LEN:
        raise InvalidArgument(f"{kind} name is {len(name)} characters; the limit is {MAX_NAME_LEN}")
    if not _NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidArgument(
            f"{kind} name {name[:40]!r} may only use letters, digits and . _ : @ / + - "
            "(starting with a letter or digit, no '..')"
        )
    return name


HTTP_PROBE_TIMEOUT_S = 5.0
GRPC_PROBE_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class BackendSpec:
    """A catalog entry: how to start one kind of backend. Only config defines these."""

    name: str
    command: tuple[str, ...]
    protocol: Protocol = "grpc"
    health_path: str = "/health"
    env: tuple[tuple[str, str], ...] = ()
    workdir: str = ""
    # The interpreter `{python}` expands to ("" = modeld's own): a backend in its own venv.
    python: str = ""
    aliases: tuple[str, ...] = ()
    # Seconds without any sign of progress before a start is given up.
    ready_timeout: float = 60.0
    # Hard ceiling on a start, however much output the backend prints.
    ready_ceiling: float = 600.0
    stop_grace: float = 10.0
    max_output_line: int = 8192
    start_attempts: int = 3
    # A replica that dies sooner than this after READY counts as a failed start (backoff).
    crash_loop_window: float = 30.0
    # Health probes of a READY replica: how long one may take (None: the protocol's
    # default), and how many failed ones in a row, spanning at least how long, prove it
    # dead (fewer only make it suspect).
    probe_timeout: float | None = None
    probe_failures: int = 3
    probe_window: float = 10.0

    @property
    def probe_limit(self) -> float:
        if self.probe_timeout is not None:
            return self.probe_timeout
        # An OpenAI-style server answers health from the queue its completions wait in,
        # so under load a healthy one takes seconds; a gRPC backend answers at once.
        return HTTP_PROBE_TIMEOUT_S if self.protocol == "http" else GRPC_PROBE_TIMEOUT_S

    # `http` only: whose Prometheus gauges to read off `metrics_path` every
    # `load_interval` (policy/load.py); "none": routing uses leases alone.
    load_metrics: str = "none"
    metrics_path: str = "/metrics"
    load_interval: float = 1.0
    # A replica reporting more requests waiting than this gets no lease while another does not.
    saturation_waiting: int = 5


@dataclass(frozen=True)
class ModelSpec:
    """What to run for a model name. `None` durations mean "use the daemon default"."""

    name: str
    backend: str
    model_file: str = ""
    options: tuple[tuple[str, str], ...] = ()
    min_replicas: int = 0
    max_replicas: int = 1
    pinned: bool = False
    groups: tuple[str, ...] = ()
    idle_ttl: float | None = None
    lease_ttl: float | None = None
    busy_timeout: float | None = None
    memory_estimate: int = 0
    gpus: int | None = None
    gpu_ids: tuple[int, ...] = ()
    source: str = "config"
    # In a cluster: the labels a host's `[cluster] labels` must all contain for it to
    # run this model, and "spread" | "binpack" ("" = the cluster's default).
    host_labels: tuple[tuple[str, str], ...] = ()
    placement: str = ""
    # Leases one replica may hold at once (its backend's parallel slots); 0 = unlimited.
    # Past it a Route waits in the model's queue, of at most `queue_max` Routes.
    parallel: int = 0
    queue_max: int = DEFAULT_QUEUE_MAX

    def option_map(self) -> dict[str, str]:
        return dict(self.options)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["options"] = dict(self.options)
        out["groups"] = list(self.groups)
        out["gpu_ids"] = list(self.gpu_ids)
        out["host_labels"] = dict(self.host_labels)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelSpec":
        data = dict(data)
        data["options"] = tuple(sorted((str(k), str(v)) for k, v in data["options"].items()))
        data["groups"] = tuple(data["groups"])
        data["gpu_ids"] = tuple(data["gpu_ids"])
        labels = data.get("host_labels") or {}
        data["host_labels"] = tuple(sorted((str(k), str(v)) for k, v in labels.items()))
        data["placement"] = data.get("placement") or ""
        return cls(**data)

    def with_source(self, source: str) -> "ModelSpec":
        return replace(self, source=source)


# What a backend's command may contain, filled in for each replica (supervisor/launch.py).
PLACEHOLDERS = ("addr", "host", "port", "model_file", "models_dir", "python")


def check_replica_count(spec: ModelSpec, replicas: int) -> None:
    """A Load of `replicas` must fit the model's max_replicas; raises FailedPrecondition."""
    if replicas > spec.max_replicas:
        allowed = "1 replica" if spec.max_replicas == 1 else f"{spec.max_replicas} replicas"
        raise FailedPrecondition(
            f"model {spec.name!r} allows at most {allowed} (max_replicas), "
            f"and {replicas} were asked for"
        )


def check_model_spec(spec: ModelSpec, backends: dict[str, BackendSpec]) -> ModelSpec:
    """Validate a spec against the catalog; returns it unchanged or raises InvalidArgument."""
    check_name("model", spec.name)
    if spec.backend not in backends:
        known = ", ".join(sorted(backends)) or "none"
        raise InvalidArgument(
            f"model {spec.name!r}: backend {spec.backend!r} is not in the catalog (known: {known})"
        )
    if spec.model_file:
        check_relative_path(spec.model_file)
    _check_counts(spec)
    _check_options(spec)
    if len(spec.groups) > MAX_GROUPS:
        raise InvalidArgument(f"model {spec.name!r}: more than {MAX_GROUPS} groups")
    for group in spec.groups:
        check_name("group", group)
    _check_placement(spec)
    durations = {
        "idle_ttl": spec.idle_ttl,
        "lease_ttl": spec.lease_ttl,
        "busy_timeout": spec.busy_timeout,
    }
    for label, seconds in durations.items():
        if seconds is not None and not 0 <= seconds <= MAX_TTL_S:
            raise InvalidArgument(f"model {spec.name!r}: {label} must be between 0 and 365 days")
    if spec.lease_ttl is not None and spec.lease_ttl < MIN_LEASE_TTL_S:
        # A lease that expires before the client can use it is never what was meant.
        raise InvalidArgument(f"model {spec.name!r}: lease_ttl must be at least 100ms")
    return spec


def _check_options(spec: ModelSpec) -> None:
    if len(spec.options) > MAX_OPTIONS:
        raise InvalidArgument(f"model {spec.name!r}: more than {MAX_OPTIONS} options")
    if sum(len(k) + len(v) for k, v in spec.options) > MAX_OPTIONS_BYTES:
        raise InvalidArgument(
            f"model {spec.name!r}: options hold more than {MAX_OPTIONS_BYTES} characters in all"
        )
    for key, value in spec.options:
        if len(key) > MAX_NAME_LEN or not _OPTION_KEY_RE.fullmatch(key):
            raise InvalidArgument(
                f"model {spec.name!r}: option name {key[:40]!r} must be 1..{MAX_NAME_LEN} "
                "letters, digits and . _ - (starting with a letter, digit or _)"
            )
        if len(value) > MAX_OPTION_LEN or "\0" in value:
            raise InvalidArgument(
                f"model {spec.name!r}: option {key!r} is longer than {MAX_OPTION_LEN} "
                "characters or contains a NUL byte"
            )
    # Typed options (context_size, cuda, ...) are checked here so a bad value is refused
    # when the spec is put, not at its first start.
    load_options.parse(spec.name, spec.options)


def _check_placement(spec: ModelSpec) -> None:
    if spec.placement not in ("", *PLACEMENTS):
        raise InvalidArgument(
            f"model {spec.name!r}: placement {spec.placement[:40]!r} must be one of "
            f"{', '.join(PLACEMENTS)} (or empty for the cluster's default)"
        )
    check_host_labels(f"model {spec.name!r}: host_labels", spec.host_labels)


def check_host_labels(where: str, labels: tuple[tuple[str, str], ...]) -> None:
    """A spec's host_labels: few, short, printable names and values."""
    if len(labels) > MAX_HOST_LABELS:
        raise InvalidArgument(f"{where}: more than {MAX_HOST_LABELS} labels")
    for key, value in labels:
        for part in (key, value):
            if len(part) > MAX_LABEL_LEN or not _LABEL_RE.fullmatch(part):
                raise InvalidArgument(
                    f"{where}: {part[:40]!r} (of label {key[:40]!r}) must be 1..{MAX_LABEL_LEN} "
                    "letters, digits and _ . / : - (starting with a letter, digit or _)"
                )


def _check_counts(spec: ModelSpec) -> None:
    if not 0 <= spec.min_replicas <= MAX_REPLICAS:
        raise InvalidArgument(f"model {spec.name!r}: min_replicas must be 0..{MAX_REPLICAS}")
    if not 1 <= spec.max_replicas <= MAX_REPLICAS:
        raise InvalidArgument(f"model {spec.name!r}: max_replicas must be 1..{MAX_REPLICAS}")
    if spec.min_replicas > spec.max_replicas:
        raise InvalidArgument(
            f"model {spec.name!r}: min_replicas ({spec.min_replicas}) exceeds "
            f"max_replicas ({spec.max_replicas})"
        )
    if not 0 <= spec.parallel <= MAX_PARALLEL:
        raise InvalidArgument(
            f"model {spec.name!r}: parallel must be 0 (unlimited) or a count up to {MAX_PARALLEL}"
        )
    if not 0 <= spec.queue_max <= MAX_QUEUE:
        raise InvalidArgument(f"model {spec.name!r}: queue_max must be 0..{MAX_QUEUE}")
    if spec.memory_estimate < 0 or spec.memory_estimate > 1 << 50:
        raise InvalidArgument(f"model {spec.name!r}: memory_estimate is out of range")
    if spec.gpus is not None and not 0 <= spec.gpus <= 16:
        raise InvalidArgument(f"model {spec.name!r}: gpus must be 0..16")
    if any(not 0 <= i < 64 for i in spec.gpu_ids) or len(set(spec.gpu_ids)) != len(spec.gpu_ids):
        raise InvalidArgument(f"model {spec.name!r}: gpu_ids must be distinct indexes 0..63")


def check_relative_path(rel: str) -> str:
    """A model file is named relative to models_dir: no absolute paths, no '..', no NUL."""
    if "\0" in rel or len(rel) > MAX_PATH_LEN:
        raise InvalidArgument(
            f"model_file contains a NUL byte or is longer than {MAX_PATH_LEN} characters"
        )
    path = Path(rel)
    if path.is_absolute() or rel.startswith("~"):
        raise InvalidArgument(f"model_file {rel[:80]!r} must be relative to the models directory")
    if ".." in path.parts:
        raise InvalidArgument(f"model_file {rel[:80]!r} must not contain '..'")
    return rel


def with_file_estimate(spec: ModelSpec, models_dir: Path) -> ModelSpec:
    """The spec with a GGUF model file's size as its memory estimate when it gives none:
    a GGUF is loaded whole, so its size is the best guess before any reading. A file that
    cannot be read leaves the spec as it is; its start reports why."""
    if spec.memory_estimate or not spec.model_file.lower().endswith(".gguf"):
        return spec
    try:
        size = resolve_model_file(models_dir, spec.model_file).stat().st_size
    except (OSError, InvalidArgument):
        return spec
    return replace(spec, memory_estimate=size)


def resolve_model_file(models_dir: Path, rel: str) -> Path:
    """The real path of a model file, which must lie inside models_dir (symlinks resolved)."""
    check_relative_path(rel)
    root = models_dir.resolve()
    target = (root / rel).resolve()
    if not target.is_relative_to(root):
        raise InvalidArgument(
            f"model_file {rel[:80]!r} resolves outside the models directory {str(root)!r}"
        )
    return target


@dataclass(frozen=True)
class Settings:
    """Runtime settings: start from config, changed through UpdateSettings, persisted."""

    busy_timeout: float = 0.0
    idle_timeout: float = 0.0
    max_loaded: int = 0
    memory_threshold: float = 0.0
    force_eviction_when_busy: bool = False
    watchdog_interval: float = 0.5
    lease_ttl: float = 600.0
    probe_ttl: float = 30.0
    # Leases a replica may hold over the average before an affinity key moves on
    # (policy/affinity.py): the bound is ceil(affinity_slack * average).
    affinity_slack: float = 1.25

    def merged(self, changes: dict[str, Any]) -> "Settings":
        merged = replace(self, **changes)
        check_settings(merged)
        return merged


SETTINGS_KEYS = frozenset(f.name for f in fields(Settings))


def check_settings(s: Settings) -> Settings:
    if not 0 <= s.busy_timeout <= 7 * 86400:
        raise InvalidArgument("busy_timeout must be between 0 (off) and 7 days")
    if not 0 <= s.idle_timeout <= 365 * 86400:
        raise InvalidArgument("idle_timeout must be between 0 (never) and 365 days")
    if not 0 <= s.max_loaded <= 1024:
        raise InvalidArgument("max_loaded must be between 0 (unlimited) and 1024")
    if not 0 <= s.memory_threshold <= 1:
        raise InvalidArgument("memory_threshold must be a fraction between 0 (off) and 1")
    if not 0.01 <= s.watchdog_interval <= 3600:
        raise InvalidArgument("watchdog_interval must be between 10ms and 1h")
    if not 1 <= s.lease_ttl <= 7 * 86400:
        raise InvalidArgument("lease_ttl must be between 1s and 7 days")
    if not 0 <= s.probe_ttl <= 3600:
        raise InvalidArgument("probe_ttl must be between 0 and 1h")
    if not 1 <= s.affinity_slack <= 100:
        raise InvalidArgument(
            "affinity_slack must be between 1 and 100 (1.25: 25% over the average)"
        )
    return s
