"""A backend that holds real GPU memory, for bench/gpu/gpu_check.py.

    python bench/gpu/gpu_backend.py --addr HOST:PORT [--report-dir DIR] [--fake-gpu-mib N]

It speaks the backend protocol (Health, LoadModel, Free, Status). LoadModel takes
the load option `alloc_mib` (as `alloc_mib:N` or `alloc_mib=N`) and allocates that
many MiB on the first visible CUDA device with plain PyTorch allocations (never
managed memory), after checking that the device has that much free; Free gives it
back. What it saw (CUDA_VISIBLE_DEVICES, device count, the device's UUID, free
memory before the allocation) and when (process start, torch imported, listening,
load begun, CUDA ready, allocation done; wall-clock seconds) go to stdout as one
`gpu_backend loaded {json}` line, and to `<report-dir>/<pid>.json` when given.

`--fake-gpu-mib N` replaces PyTorch with a pretend device of N MiB (for the tests
on machines without a GPU); `--fake-dir DIR` makes the fake backends share it.
Without it and without PyTorch, LoadModel fails with a message that says so.
"""
# ruff: noqa: E402
# The wall-clock time is taken before the heavy imports, so the report can tell them apart.

import time

IMPORT_STARTED = time.time()

import argparse
import asyncio
import json
import os
import signal
import sys
import uuid as uuidlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc

from modeld._proto.backend import backend_pb2 as pb
from modeld._proto.backend import backend_pb2_grpc as pb_grpc

IMPORTS_DONE = time.time()

MIB = 1 << 20
# Left free on the device after an allocation: the caching allocator rounds up, and
# a device filled to the last byte fails the next context's creation.
HEADROOM = 256 * MIB
STOP_GRACE_S = 2.0
LOADED_PREFIX = "gpu_backend loaded "
FAKE_UUID = "GPU-fake-0"
FAKE_CONTEXT = 300 * MIB
FAKE_RESOURCES = "resources.json"


class LoadError(Exception):
    """A load that cannot be done; its message goes back in Result.message."""


@dataclass(frozen=True)
class DeviceInfo:
    device_count: int
    uuid: str
    name: str
    total: int
    # "domain:bus:device" as CUDA numbers it; "" when PyTorch does not say.
    pci: str = ""


class Allocator(Protocol):
    def init(self) -> DeviceInfo:
        """Create the CUDA context (once) and describe the visible device 0."""
        ...

    def mem_info(self) -> tuple[int, int]:
        """(free, total) bytes on the visible device 0, as the driver reports them."""
        ...

    def allocate(self, nbytes: int) -> None: ...

    def release(self) -> None: ...


class TorchAllocator:
    """Plain device allocations through PyTorch's caching allocator (cudaMalloc)."""

    def __init__(self, torch: Any) -> None:
        self._torch = torch
        self._blocks: list[Any] = []
        self._info: DeviceInfo | None = None

    def init(self) -> DeviceInfo:
        if self._info is None:
            cuda = self._torch.cuda
            if not cuda.is_available():
                raise LoadError(
                    "CUDA is not available to PyTorch here "
                    f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
                )
            cuda.init()
            props = cuda.get_device_properties(0)
            uuid = uuid_text(getattr(props, "uuid", None))
            pci = ":".join(
                f"{getattr(props, f'pci_{part}_id', -1):02x}"
                for part in ("domain", "bus", "device")
            )
            count = cuda.device_count()
            self._info = DeviceInfo(count, uuid, props.name, props.total_memory, pci)
            # mem_get_info creates the context, so CUDA init is over once it returns.
            cuda.mem_get_info(0)
        return self._info

    def mem_info(self) -> tuple[int, int]:
        free, total = self._torch.cuda.mem_get_info(0)
        return int(free), int(total)

    def allocate(self, nbytes: int) -> None:
        torch = self._torch
        block = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0")
        torch.cuda.synchronize(0)
        self._blocks.append(block)

    def release(self) -> None:
        self._blocks.clear()
        if self._info is not None:
            self._torch.cuda.synchronize(0)
            self._torch.cuda.empty_cache()


class FakeAllocator:
    """A pretend device for tests: counts bytes, allocates nothing.

    With `shared`, every fake backend writes what it holds to `shared/<pid>` and reads
    the others', so several of them (and gpu_check.py --fake-gpu) see one device."""

    def __init__(self, total: int, shared: Path | None = None) -> None:
        self.total = total
        self.used = 0
        self._shared = shared
        self._context = 0

    def init(self) -> DeviceInfo:
        self._context = FAKE_CONTEXT
        self._write()
        return DeviceInfo(1, FAKE_UUID, "Fake GPU", self.total)

    def mem_info(self) -> tuple[int, int]:
        used = fake_device_used(self._shared) if self._shared else self.used + self._context
        return max(self.total - used, 0), self.total

    def allocate(self, nbytes: int) -> None:
        self.used += nbytes
        self._write()

    def release(self) -> None:
        self.used = 0
        self._write()

    def _write(self) -> None:
        if self._shared is not None:
            (self._shared / str(os.getpid())).write_text(str(self.used + self._context))
            # At once, as NVML would show it, not at the checker's next refresh.
            write_fake_resources(self._shared, self.total)


def write_fake_resources(shared: Path, total: int) -> None:
    """modeld's `[resources] fake_path` file (`shared/resources.json`) from what the fake
    backends hold now; replaced atomically, so modeld never reads half of it."""
    processes = fake_process_memory(shared)
    gpu = {"index": 0, "uuid": FAKE_UUID, "name": "Fake GPU", "total": total}
    data = {
        "ram_total": 64 << 30,
        "ram_available": 32 << 30,
        "gpus": [{**gpu, "used": sum(processes.values())}],
        "processes": {str(pid): used for pid, used in processes.items()},
    }
    tmp = shared / f".resources.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(data))
    tmp.replace(shared / FAKE_RESOURCES)


def fake_device_used(shared: Path) -> int:
    """Bytes the live fake backends under `shared` hold (a dead one's memory is free)."""
    return sum(fake_process_memory(shared).values())


def fake_process_memory(shared: Path) -> dict[int, int]:
    out = {}
    for entry in shared.iterdir():
        if entry.name.isdigit() and _alive(int(entry.name)):
            try:
                out[int(entry.name)] = int(entry.read_text() or 0)
            except (OSError, ValueError):
                continue
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class MissingTorch:
    """Stands in when PyTorch cannot be imported: every load fails and says why."""

    def __init__(self, reason: str) -> None:
        self._reason = reason

    def init(self) -> DeviceInfo:
        raise LoadError(f"PyTorch is not installed for {sys.executable}: {self._reason}")

    def mem_info(self) -> tuple[int, int]:
        return 0, 0

    def allocate(self, nbytes: int) -> None:
        raise LoadError("PyTorch is not installed")

    def release(self) -> None:
        return None


def uuid_text(raw: Any) -> str:
    """PyTorch's device UUID as text; its str() is the dashed form in the releases we know."""
    if raw is None:
        return ""
    text = str(raw)
    if "-" not in text and hasattr(raw, "bytes"):
        text = str(uuidlib.UUID(bytes=bytes(raw.bytes)))
    return text


def parse_options(options: list[str]) -> dict[str, str]:
    """Load options as a dict; each entry is `key:value` or `key=value` (first separator wins)."""
    out: dict[str, str] = {}
    for entry in options:
        cut = min((i for i in (entry.find(":"), entry.find("=")) if i >= 0), default=-1)
        if cut <= 0:
            raise LoadError(f"bad load option {entry!r}: expected key:value or key=value")
        out[entry[:cut].strip()] = entry[cut + 1 :].strip()
    return out


def alloc_bytes(options: list[str]) -> int:
    """The allocation a load asks for: option alloc_mib (a whole number >= 0), default 0."""
    value = parse_options(options).get("alloc_mib", "0")
    if not value.isdigit():
        raise LoadError(f"load option alloc_mib must be a whole number of MiB, not {value!r}")
    return int(value) * MIB


def process_started_wall() -> float:
    """When this process started (wall clock), from /proc; the import time if unreadable."""
    try:
        stat = Path("/proc/self/stat").read_text()
        start_ticks = int(stat.rpartition(")")[2].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return IMPORT_STARTED
    return min(time.time() - age, IMPORT_STARTED)


@dataclass
class Marks:
    """Wall-clock seconds of each step, for the cold-start split."""

    proc_start: float = 0.0
    import_start: float = IMPORT_STARTED
    imports_done: float = IMPORTS_DONE
    torch_imported: float = 0.0
    listening: float = 0.0
    load_begin: float = 0.0
    cuda_ready: float = 0.0
    alloc_done: float = 0.0


class GpuBackend(pb_grpc.BackendServicer):
    def __init__(self, allocator: Allocator, marks: Marks, report_dir: Path | None) -> None:
        self._alloc = allocator
        self._marks = marks
        self._report_dir = report_dir
        self._held = 0
        self._state = pb.StatusResponse.UNINITIALIZED
        self._lock = asyncio.Lock()
        self.report: dict[str, Any] = {}

    async def Health(self, request: pb.HealthMessage, context: Any) -> pb.Reply:
        return pb.Reply(message=b"OK")

    async def LoadModel(self, request: pb.ModelOptions, context: Any) -> pb.Result:
        async with self._lock:
            self._state = pb.StatusResponse.BUSY
            try:
                # CUDA calls block; the event loop keeps answering Health meanwhile.
                message = await asyncio.to_thread(self._load, list(request.Options))
            except LoadError as exc:
                self._state = pb.StatusResponse.ERROR
                print(f"error: {exc}", file=sys.stderr, flush=True)
                return pb.Result(success=False, message=str(exc))
            self._state = pb.StatusResponse.READY
            return pb.Result(success=True, message=message)

    def _load(self, options: list[str]) -> str:
        nbytes = alloc_bytes(options)
        self._marks.load_begin = time.time()
        info = self._alloc.init()
        self._marks.cuda_ready = time.time()
        free, total = self._alloc.mem_info()
        if nbytes + HEADROOM > free:
            raise LoadError(
                f"cannot allocate {nbytes // MIB} MiB on {info.uuid}: only {free // MIB} MiB "
                f"of {total // MIB} MiB free ({HEADROOM // MIB} MiB must stay free)"
            )
        if nbytes:
            self._alloc.allocate(nbytes)
        self._marks.alloc_done = time.time()
        self._held += nbytes
        free_after, _ = self._alloc.mem_info()
        self.report = {
            "pid": os.getpid(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "cuda_device_order": os.environ.get("CUDA_DEVICE_ORDER"),
            **asdict(info),
            "alloc_bytes": nbytes,
            "free_before": free,
            "free_after": free_after,
            "marks": asdict(self._marks),
        }
        self._publish()
        return f"allocated {nbytes // MIB} MiB on {info.uuid}"

    def _publish(self) -> None:
        line = json.dumps(self.report, sort_keys=True)
        print(LOADED_PREFIX + line, flush=True)
        if self._report_dir is not None:
            path = self._report_dir / f"{os.getpid()}.json"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(line)
            tmp.replace(path)

    async def Free(self, request: pb.HealthMessage, context: Any) -> pb.Result:
        async with self._lock:
            await asyncio.to_thread(self._alloc.release)
            self._held = 0
            self._state = pb.StatusResponse.UNINITIALIZED
        return pb.Result(success=True, message="freed")

    async def Status(self, request: pb.HealthMessage, context: Any) -> pb.StatusResponse:
        breakdown = {"alloc_bytes": self._held}
        if self.report:
            breakdown["device_count"] = self.report["device_count"]
            breakdown["free_before"] = self.report["free_before"]
        memory = pb.MemoryUsageData(total=self._held, breakdown=breakdown)
        return pb.StatusResponse(state=self._state, memory=memory)


def make_allocator(fake_mib: int | None, fake_dir: Path | None, marks: Marks) -> Allocator:
    if fake_mib is not None:
        return FakeAllocator(fake_mib * MIB, fake_dir)
    try:
        import torch
    except ImportError as exc:
        return MissingTorch(str(exc))
    marks.torch_imported = time.time()
    return TorchAllocator(torch)


async def serve(
    addr: str, fake_mib: int | None, fake_dir: Path | None, report_dir: Path | None
) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    marks = Marks(proc_start=process_started_wall())
    backend = GpuBackend(make_allocator(fake_mib, fake_dir, marks), marks, report_dir)
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_BackendServicer_to_server(backend, server)  # type: ignore[no-untyped-call]
    try:
        port = server.add_insecure_port(addr)
    except RuntimeError:
        print(f"cannot listen on {addr}", file=sys.stderr, flush=True)
        return 1
    await server.start()
    marks.listening = time.time()
    print(f"gpu_backend listening addr={addr.rpartition(':')[0]}:{port}", flush=True)
    await stop.wait()
    print("gpu_backend stopping", file=sys.stderr, flush=True)
    await server.stop(STOP_GRACE_S)
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addr", required=True, help="HOST:PORT to listen on (port 0: any)")
    parser.add_argument("--report-dir", type=Path, default=None)
    parser.add_argument("--fake-gpu-mib", type=int, default=None, metavar="N")
    parser.add_argument("--fake-dir", type=Path, default=None, help="share one fake device")
    ns = parser.parse_args(argv)
    sys.exit(asyncio.run(serve(ns.addr, ns.fake_gpu_mib, ns.fake_dir, ns.report_dir)))


if __name__ == "__main__":
    main()
