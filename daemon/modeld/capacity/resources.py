"""GPU and RAM readings behind one interface, so the watchdog and placement can be tested.

`SystemReader` reads host RAM from /proc/meminfo and GPUs through NVML (`pynvml`,
from the optional `nvidia-ml-py` package). Without the library, a driver or a GPU it
reports no GPUs and never raises. GPU indexes are NVML's, which follow PCI bus order:
a backend must be started with CUDA_DEVICE_ORDER=PCI_BUS_ID for CUDA to agree.

`FakeReader` reads a JSON file on every call, so a test can change what the daemon
sees while it runs (write it with `write_fake`, which replaces the file atomically)::

    {
      "ram_total": 68719476736,          # bytes
      "ram_available": 34359738368,      # bytes
      "gpus": [                          # optional; [] or absent = no GPUs
        {"index": 0, "uuid": "GPU-fake-0", "name": "Fake", "total": 25769803776, "used": 0,
         "pids": [4242]}                 # optional; compute processes listed on this GPU
      ],
      "processes": {"4242": 1073741824}  # optional; pid (as a string) -> GPU bytes used
    }

A pid in "processes" but in no GPU's "pids" counts as listed on every GPU.
"""

import ctypes
import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import structlog

from modeld.policy.view import GpuView, HostView

log = structlog.get_logger(__name__)

MEMINFO = Path("/proc/meminfo")
# The library pynvml's nvmlInit loads on Linux.
NVML_LIBRARY = "libnvidia-ml.so.1"


class ResourceReader(Protocol):
    def read(self) -> HostView:
        """Current host RAM and GPU memory; synchronous and fast (no subprocesses)."""
        ...

    def process_gpu_memory(self) -> dict[int, int]:
        """GPU bytes used per pid, summed over GPUs; empty when unknown."""
        ...

    def gpu_processes(self) -> dict[int, set[int]]:
        """The pids each GPU (by index) lists as its compute processes; empty when unknown."""
        ...


def read_meminfo(path: Path = MEMINFO) -> tuple[int, int]:
    """(total, available) RAM in bytes; (0, 0) when the file cannot be read."""
    try:
        text = path.read_text()
    except OSError:
        return (0, 0)
    fields: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            scale = 1024 if parts[1:] == ["kB"] else 1
            fields[key.strip()] = int(parts[0]) * scale
    total = fields.get("MemTotal", 0)
    # Kernels before 3.14 have no MemAvailable; MemFree understates but never overstates.
    available = fields.get("MemAvailable", fields.get("MemFree", 0))
    return (total, available)


def nvml_missing(library: str = NVML_LIBRARY) -> str | None:
    """Why NVML's library cannot be loaded here, or None when it can.

    Asked before pynvml is imported: importing it costs ~10 ms of every start, spent
    for nothing on the hosts (most that run modeld without a GPU) that lack the driver.
    """
    try:
        ctypes.CDLL(library)
    except OSError as exc:
        # pynvml's words for the same failure, then the loader's.
        return f"NVML Shared Library Not Found ({exc})"
    return None


class NvmlReader:
    """GPU readings through NVML; `available` is False when there is nothing to read."""

    def __init__(self, missing: Callable[[], str | None] = nvml_missing) -> None:
        self._nvml: Any = None
        # (index, handle, uuid, name): uuid and name never change, so they are read once.
        self._devices: list[tuple[int, Any, str, str]] = []
        self._failing: set[int] = set()
        if (why := missing()) is not None:
            log.info("nvml_unavailable", reason=why)
            return
        try:
            import pynvml

            pynvml.nvmlInit()
        except ImportError:
            log.info("nvml_unavailable", reason="nvidia-ml-py is not installed")
            return
        except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
            log.info("nvml_unavailable", reason=str(exc))
            return
        try:
            self._devices = _list_devices(pynvml)
        except pynvml.NVMLError as exc:
            log.warning("nvml_unavailable", reason=str(exc))
        if not self._devices:
            pynvml.nvmlShutdown()
            return
        self._nvml = pynvml
        log.info("nvml_ready", gpus=len(self._devices))

    @property
    def available(self) -> bool:
        return self._nvml is not None

    def gpus(self) -> tuple[GpuView, ...]:
        """GPUs whose memory could be read now; one that fails is left out and logged once."""
        out: list[GpuView] = []
        for index, handle, uuid, name in self._devices:
            try:
                mem = self._nvml.nvmlDeviceGetMemoryInfo(handle)
            except self._nvml.NVMLError as exc:
                if index not in self._failing:
                    self._failing.add(index)
                    log.warning("nvml_read_failed", gpu=index, error=str(exc))
                continue
            self._failing.discard(index)
            out.append(GpuView(index, uuid, name, int(mem.total), int(mem.used)))
        return tuple(out)

    def process_gpu_memory(self) -> dict[int, int]:
        """Host-namespace pids: inside a PID namespace they will not match the children's."""
        out: dict[int, int] = {}
        for _, handle, _, _ in self._devices:
            try:
                processes = self._nvml.nvmlDeviceGetComputeRunningProcesses(handle)
            except self._nvml.NVMLError:
                continue
            for proc in processes:
                # None when the driver may not tell (unprivileged, some virtualised GPUs).
                if proc.usedGpuMemory is not None:
                    out[int(proc.pid)] = out.get(int(proc.pid), 0) + int(proc.usedGpuMemory)
        return out

    def gpu_processes(self) -> dict[int, set[int]]:
        """Listed whether or not the driver tells their memory use; a GPU that cannot be
        read is left out (its processes then count as gone)."""
        out: dict[int, set[int]] = {}
        for index, handle, _, _ in self._devices:
            try:
                processes = self._nvml.nvmlDeviceGetComputeRunningProcesses(handle)
            except self._nvml.NVMLError:
                continue
            out[index] = {int(proc.pid) for proc in processes}
        return out

    def close(self) -> None:
        if self._nvml is not None:
            self._nvml.nvmlShutdown()
            self._nvml = None
            self._devices = []


def _list_devices(nvml: Any) -> list[tuple[int, Any, str, str]]:
    devices = []
    for index in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        uuid = _text(nvml.nvmlDeviceGetUUID(handle))
        devices.append((index, handle, uuid, _text(nvml.nvmlDeviceGetName(handle))))
    return devices


def _text(value: str | bytes) -> str:
    """Old pynvml releases return bytes."""
    return value.decode() if isinstance(value, bytes) else value


class SystemReader:
    def __init__(self, nvml: NvmlReader | None = None, meminfo: Path = MEMINFO) -> None:
        self._nvml = nvml if nvml is not None else NvmlReader()
        self._meminfo = meminfo

    def read(self) -> HostView:
        total, available = read_meminfo(self._meminfo)
        gpus = self._nvml.gpus() if self._nvml.available else ()
        return HostView(total, available, gpus)

    def process_gpu_memory(self) -> dict[int, int]:
        return self._nvml.process_gpu_memory() if self._nvml.available else {}

    def gpu_processes(self) -> dict[int, set[int]]:
        return self._nvml.gpu_processes() if self._nvml.available else {}

    def close(self) -> None:
        self._nvml.close()


class FakeReader:
    """Readings from a JSON file (format in the module docstring), re-read on every call."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def read(self) -> HostView:
        data = self._load()
        try:
            gpus = tuple(_gpu(g) for g in data.get("gpus", []))
            return HostView(_count(data, "ram_total"), _count(data, "ram_available"), gpus)
        except (TypeError, KeyError, ValueError) as exc:
            raise ValueError(f"fake resources file {self._path}: {exc}") from exc

    def process_gpu_memory(self) -> dict[int, int]:
        processes = self._load().get("processes", {})
        try:
            return {int(pid): _count(processes, pid) for pid in processes}
        except (TypeError, ValueError) as exc:
            raise ValueError(f"fake resources file {self._path}: {exc}") from exc

    def gpu_processes(self) -> dict[int, set[int]]:
        data = self._load()
        try:
            everywhere = {int(pid) for pid in data.get("processes", {})}
            return {
                _count(g, "index"): {int(pid) for pid in g.get("pids", [])} | everywhere
                for g in data.get("gpus", [])
            }
        except (TypeError, ValueError) as exc:
            raise ValueError(f"fake resources file {self._path}: {exc}") from exc

    def _load(self) -> dict[str, Any]:
        data = json.loads(self._path.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"fake resources file {self._path}: expected a JSON object")
        return data


def _gpu(data: dict[str, Any]) -> GpuView:
    return GpuView(
        _count(data, "index"),
        str(data["uuid"]),
        str(data["name"]),
        _count(data, "total"),
        _count(data, "used"),
    )


def _count(data: Mapping[str, Any], key: str) -> int:
    if key not in data:
        raise ValueError(f"{key!r} is missing")
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key!r} must be a non-negative integer, got {value!r}")
    return value


def write_fake(
    path: Path,
    host: HostView,
    processes: Mapping[int, int] | None = None,
    gpu_pids: Mapping[int, Iterable[int]] | None = None,
) -> None:
    """Write a FakeReader file; a reader never sees it half-written. `gpu_pids`: the
    compute processes listed per GPU index."""
    listed = gpu_pids or {}
    data = {
        "ram_total": host.ram_total,
        "ram_available": host.ram_available,
        "gpus": [
            {
                "index": g.index,
                "uuid": g.uuid,
                "name": g.name,
                "total": g.total,
                "used": g.used,
                "pids": sorted(listed.get(g.index, ())),
            }
            for g in host.gpus
        ],
        "processes": {str(pid): used for pid, used in (processes or {}).items()},
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def make_reader(fake_path: str | None) -> ResourceReader:
    return FakeReader(Path(fake_path)) if fake_path else SystemReader()
