"""Owns the runtime settings: config values, overlaid by ones changed through the API.

A change is written to the registry before it takes effect, so an acknowledged
UpdateSettings survives a restart.
"""

import asyncio
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import structlog

from modeld.errors import InvalidArgument
from modeld.spec import SETTINGS_KEYS, Settings
from modeld.storage.registry import Registry

log = structlog.get_logger(__name__)


class SettingsStore:
    def __init__(self, registry: Registry, initial: Settings) -> None:
        self._registry = registry
        self._current = initial
        # Serializes read-merge-write of this one object; held only across a local
        # registry commit, never across process or network waits.
        self._lock = asyncio.Lock()
        self._watchers: list[Callable[[], None]] = []

    @property
    def current(self) -> Settings:
        return self._current

    def watch(self, changed: Callable[[], None]) -> None:
        """Call `changed` after every update (admission waiters re-plan at once)."""
        self._watchers.append(changed)

    async def load(self) -> None:
        stored = {
            k: v for k, v in (await self._registry.get_settings()).items() if k in SETTINGS_KEYS
        }
        if stored:
            try:
                self._current = self._current.merged(stored)
            except (InvalidArgument, TypeError) as exc:
                log.warning("stored_settings_ignored", error=str(exc))

    async def update(self, changes: dict[str, Any]) -> Settings:
        unknown = set(changes) - SETTINGS_KEYS
        if unknown:
            raise InvalidArgument(f"unknown settings: {', '.join(sorted(unknown))}")
        async with self._lock:
            updated = self._current.merged(changes)
            if updated != self._current:
                await self._registry.put_settings({k: asdict(updated)[k] for k in changes})
                log.info("settings_updated", **changes)
            self._current = updated
        for changed in self._watchers:
            changed()
        return updated
