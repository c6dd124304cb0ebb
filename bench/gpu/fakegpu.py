"""`gpu_check.py --fake-gpu`: the whole check against one pretend device, for trying the
script (and testing it) where there is no GPU. It proves nothing about a real GPU.

The fake backends (gpu_backend.py --fake-gpu-mib N --fake-dir DIR) write what each
holds to DIR/<pid>; this reads them like NVML would (a dead process holds nothing)
and shows the same figures to modeld through its `[resources] fake_path` file.
"""

import asyncio
from dataclasses import dataclass
from pathlib import Path

from gpu_backend import FAKE_RESOURCES, FAKE_UUID, fake_process_memory, write_fake_resources

GIB = 1 << 30
FAKE_TOTAL = 16 * GIB
FEED_INTERVAL_S = 0.05


@dataclass(frozen=True)
class Mem:
    free: int
    used: int
    total: int


class FakeNvml:
    def __init__(self, work: Path, total: int = FAKE_TOTAL) -> None:
        self.dir = work / "fakegpu"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.resources = self.dir / FAKE_RESOURCES
        self.total = total
        self.uuids = [FAKE_UUID]
        self.names = ["Fake GPU"]
        self.pci = ["00000000:00:00.0"]
        self.feed()

    def mem(self, index: int = 0) -> Mem:
        used = sum(fake_process_memory(self.dir).values())
        return Mem(self.total - used, used, self.total)

    def feed(self) -> None:
        """Rewrite modeld's fake resources file (a dead backend's memory is free)."""
        write_fake_resources(self.dir, self.total)

    async def feeder(self) -> None:
        while True:
            self.feed()
            await asyncio.sleep(FEED_INTERVAL_S)

    def config(self) -> tuple[str, str]:
        """(extra backend argv as TOML list items, the [resources] table)."""
        args = f', "--fake-gpu-mib", "{self.total >> 20}", "--fake-dir", "{self.dir}"'
        return args, f'[resources]\nfake_path = "{self.resources}"\n'

    def close(self) -> None:
        return None
