"""`[models.NAME]` tables of the config file: parsed and checked into ModelSpecs."""

from collections.abc import Mapping
from typing import Any

from modeld.config.values import (
    Parser,
    boolean,
    check_config_name,
    choice,
    int_list,
    integer,
    parse_table,
    str_list,
    str_map,
    text,
)
from modeld.errors import ConfigError, InvalidArgument
from modeld.spec import PLACEMENTS, BackendSpec, ModelSpec, check_model_spec
from modeld.units import parse_duration, parse_size

# What a config file without backends of its own gets (config.load): the demo backend
# over the LocalAI gRPC protocol and over OpenAI-style HTTP, and a model for each.
DEMO_CATALOG: dict[str, Any] = {
    "backends": {
        "echo": {
            "command": ["{python}", "-m", "modeld.backends.echo", "--addr", "{addr}"],
            "protocol": "grpc",
        },
        "echo-http": {
            "command": ["{python}", "-m", "modeld.backends.echo_http", "--addr", "{addr}"],
            "protocol": "http",
            "health_path": "/health",
        },
    },
    "models": {"echo": {"backend": "echo"}, "echo-http": {"backend": "echo-http"}},
}
MODEL_KEYS: dict[str, Parser] = {
    "backend": text,
    "model_file": text,
    "options": str_map,
    "min_replicas": integer,
    "max_replicas": integer,
    "pinned": boolean,
    "groups": str_list,
    "idle_ttl": parse_duration,
    "lease_ttl": parse_duration,
    "busy_timeout": parse_duration,
    "memory_estimate": parse_size,
    "gpus": integer,
    "gpu_ids": int_list,
    "host_labels": str_map,
    "placement": choice(*PLACEMENTS),
    "parallel": integer,
    "queue_max": integer,
}


def build_models(
    data: Any, backends: Mapping[str, BackendSpec], aliases: Mapping[str, str]
) -> dict[str, ModelSpec]:
    if not isinstance(data, dict):
        raise ConfigError("config: models: expected a table of [models.NAME] tables")
    models = {}
    for name, table in data.items():
        where = f"models.{name}"
        check_config_name(where, "model", name)
        values = parse_table(where, table, MODEL_KEYS)
        if "backend" not in values:
            raise ConfigError(f"config: {where}.backend: required")
        values["backend"] = aliases.get(values["backend"], values["backend"])
        try:
            models[name] = check_model_spec(ModelSpec(name=name, **values), dict(backends))
        except InvalidArgument as exc:
            raise ConfigError(f"config: {where}: {exc}{_demo_hint(values['backend'])}") from None
    return models


def _demo_hint(backend: str) -> str:
    if backend not in DEMO_CATALOG["backends"]:
        return ""
    demo = ", ".join(DEMO_CATALOG["backends"])
    return (
        f"; the demo backends ({demo}) are built in only while the config file has no "
        f"[backends] table: define [backends.{backend}] in it (README, Configuration)"
    )
