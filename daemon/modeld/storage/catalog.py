"""The model catalog: owns the merged set of model specs (config file + API).

Specs from the config file are rewritten into the registry at every start (so
tools reading the database see what runs); specs put through the API are
durable and survive restarts. A config spec wins over an API spec of the same
name, and the API may not overwrite or delete a config spec.

In cluster mode the API specs are the cluster's (cluster/specs.py stores them in
PostgreSQL and calls `adopt_shared` with the whole set after every change); the
registry keeps a copy, so a host started while the database is down has them.
"""

from collections.abc import Mapping
from dataclasses import replace

import structlog

from modeld.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from modeld.spec import BackendSpec, ModelSpec, check_model_spec
from modeld.storage.registry import Registry

log = structlog.get_logger(__name__)

# Bounds what ListModels returns, so the list always fits in one gRPC message.
MAX_API_MODELS = 128


class Catalog:
    def __init__(
        self,
        registry: Registry,
        backends: Mapping[str, BackendSpec],
        aliases: Mapping[str, str],
        config_models: Mapping[str, ModelSpec],
    ) -> None:
        self._registry = registry
        self.backends = dict(backends)
        self.aliases = dict(aliases)
        self._config_models = dict(config_models)
        self._models: dict[str, ModelSpec] = {}
        # Names of new API models whose registry write is in flight (they count too).
        self._adding: set[str] = set()

    async def load(self) -> None:
        """Merge durable API specs with the config's, and write the config's through."""
        stored = {spec.name: spec for spec in await self._registry.list_models()}
        merged: dict[str, ModelSpec] = {}
        for name, spec in stored.items():
            if spec.source == "config" and name not in self._config_models:
                await self._registry.delete_model(name)
            elif spec.source != "config":
                merged[name] = spec
        for name, spec in self._config_models.items():
            if merged.get(name, spec).source != "config":
                log.warning("config_model_shadows_api_model", model=name)
            merged[name] = spec.with_source("config")
            await self._registry.put_model(merged[name])
        self._models = merged

    def knows(self, name: str) -> bool:
        """A defined model (its name was checked when it was defined)."""
        return name in self._models

    def get(self, name: str) -> ModelSpec:
        spec = self._models.get(name)
        if spec is None:
            raise NotFound(
                f"model {name!r} is not defined; `modeld models` (the ListModels RPC) lists "
                "the models modeld knows"
            )
        return spec

    def backend(self, name: str) -> BackendSpec:
        backend = self.backends.get(self.aliases.get(name, name))
        if backend is None:
            raise NotFound(f"backend {name!r} is not in the catalog")
        return backend

    def list(self) -> list[ModelSpec]:
        return [self._models[name] for name in sorted(self._models)]

    def check(self, spec: ModelSpec) -> ModelSpec:
        """A spec the API may put: validated, its backend canonical, not a config model."""
        spec = spec.with_source("api")
        spec = check_model_spec(spec, self._backends_with_aliases())
        spec = _canonical_backend(spec, self.aliases)
        if spec.name in self._config_models:
            raise FailedPrecondition(
                f"model {spec.name!r} is defined in the config file; change it there"
            )
        return spec

    async def put(self, spec: ModelSpec) -> ModelSpec:
        spec = self.check(spec)
        is_new = spec.name not in self._models and spec.name not in self._adding
        if is_new and self._api_count() + len(self._adding) >= MAX_API_MODELS:
            raise ResourceExhausted(
                f"modeld holds {MAX_API_MODELS} models put through the API, its limit; "
                "delete one first"
            )
        if is_new:
            self._adding.add(spec.name)
        try:
            await self._registry.put_model(spec)
        finally:
            self._adding.discard(spec.name)
        self._models[spec.name] = spec
        log.info("model_put", model=spec.name, backend=spec.backend)
        return spec

    async def delete(self, name: str) -> bool:
        if name in self._config_models:
            raise FailedPrecondition(
                f"model {name!r} is defined in the config file; remove it there"
            )
        if name not in self._models:
            return False
        await self._registry.delete_model(name)
        del self._models[name]
        log.info("model_deleted", model=name)
        return True

    def config_spec(self, name: str) -> ModelSpec | None:
        return self._config_models.get(name)

    async def adopt_shared(self, shared: Mapping[str, ModelSpec]) -> dict[str, str]:
        """Cluster mode: the API models become exactly the cluster's `shared` specs (those
        a config model of the same name does not shadow), written through to the registry.

        Returns model -> why for the specs this host cannot use (e.g. its backend is not
        in this host's catalog); they are left out here, and the caller says so.
        """
        unusable: dict[str, str] = {}
        wanted: dict[str, ModelSpec] = {}
        for name, spec in shared.items():
            if name in self._config_models:
                continue
            try:
                wanted[name] = self.check(spec)
            except (InvalidArgument, FailedPrecondition) as exc:
                unusable[name] = str(exc)
        for name in [n for n, s in self._models.items() if s.source != "config"]:
            if name not in wanted:
                await self._registry.delete_model(name)
                del self._models[name]
                log.info("model_deleted", model=name, by="cluster")
        for name, spec in wanted.items():
            if self._models.get(name) != spec:
                await self._registry.put_model(spec)
                self._models[name] = spec
                log.info("model_put", model=name, backend=spec.backend, by="cluster")
        return unusable

    def _api_count(self) -> int:
        return sum(1 for spec in self._models.values() if spec.source != "config")

    def _backends_with_aliases(self) -> dict[str, BackendSpec]:
        out = dict(self.backends)
        out.update({alias: self.backends[target] for alias, target in self.aliases.items()})
        return out


def _canonical_backend(spec: ModelSpec, aliases: Mapping[str, str]) -> ModelSpec:
    return replace(spec, backend=aliases.get(spec.backend, spec.backend))
