"""What every replica is built with: the daemon's shared services and its knobs."""

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from modeld.clock import Clock
from modeld.ops.events import EventBus
from modeld.ops.logstore import LogStore
from modeld.storage.registry import Registry
from modeld.supervisor.containment import Containment
from modeld.supervisor.process import Spawner, free_port


@dataclass(frozen=True)
class ReplicaDeps:
    clock: Clock
    spawner: Spawner
    registry: Registry
    logs: LogStore
    events: EventBus
    models_dir: Path
    python: str = sys.executable
    host: str = "127.0.0.1"
    node_id: str = "local"
    # Picks the port of each start attempt; tests inject one to force a clash.
    ports: Callable[[str], int] = free_port
    # How every descendant of a backend is found and stopped (the daemon probes for it).
    containment: Containment = field(default_factory=Containment.marker_only)
    # (replica id, GPU ids, every pid it had): its processes are gone, its GPU memory
    # may not be yet (capacity/releasing.py).
    on_released: Callable[[str, tuple[int, ...], list[int]], None] | None = None
