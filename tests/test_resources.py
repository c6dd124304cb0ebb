import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from modeld.capacity.resources import (
    FakeReader,
    NvmlReader,
    SystemReader,
    make_reader,
    nvml_missing,
    read_meminfo,
    write_fake,
)
from modeld.policy.view import GpuView, HostView

GIB = 1 << 30


def test_read_meminfo_scales_kb_to_bytes(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(
        "MemTotal:       16384000 kB\nMemFree:         1024000 kB\nMemAvailable:    8192000 kB\n"
        "HugePages_Total:       0\n"
    )
    assert read_meminfo(meminfo) == (16384000 * 1024, 8192000 * 1024)


def test_read_meminfo_falls_back_to_memfree_and_tolerates_absence(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 2048 kB\nMemFree: 1024 kB\n")
    assert read_meminfo(meminfo) == (2048 * 1024, 1024 * 1024)
    assert read_meminfo(tmp_path / "absent") == (0, 0)


@pytest.mark.skipif(not Path("/proc/meminfo").exists(), reason="needs Linux /proc")
def test_read_meminfo_reads_this_host() -> None:
    total, available = read_meminfo()
    assert total > 0
    assert 0 < available <= total


HOST = HostView(
    ram_total=64 * GIB,
    ram_available=32 * GIB,
    gpus=(GpuView(0, "GPU-fake-0", "Fake", 24 * GIB, 2 * GIB),),
)


def test_fake_reader_round_trips_and_rereads_on_every_call(tmp_path: Path) -> None:
    path = tmp_path / "resources.json"
    write_fake(path, HOST, {4242: GIB})
    reader = FakeReader(path)
    assert reader.read() == HOST
    assert reader.process_gpu_memory() == {4242: GIB}
    busier = HostView(HOST.ram_total, GIB, (GpuView(0, "GPU-fake-0", "Fake", 24 * GIB, 23 * GIB),))
    write_fake(path, busier)
    assert reader.read() == busier
    assert reader.process_gpu_memory() == {}
    assert list(tmp_path.iterdir()) == [path]


def test_fake_reader_accepts_the_documented_minimal_file(tmp_path: Path) -> None:
    path = tmp_path / "resources.json"
    path.write_text('{"ram_total": 100, "ram_available": 40}')
    assert FakeReader(path).read() == HostView(100, 40, ())
    assert FakeReader(path).process_gpu_memory() == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[]", "expected a JSON object"),
        ('{"ram_available": 1}', "'ram_total' is missing"),
        ('{"ram_total": -1, "ram_available": 1}', "non-negative integer"),
        ('{"ram_total": 1, "ram_available": 1, "gpus": [{"index": 0}]}', "'uuid'"),
        ('{"ram_total": 1, "ram_available": true}', "non-negative integer"),
    ],
)
def test_fake_reader_names_the_file_and_the_problem(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "resources.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        FakeReader(path).read()
    assert str(path) in str(info.value)


def test_fake_reader_rejects_bad_process_entries(tmp_path: Path) -> None:
    path = tmp_path / "resources.json"
    path.write_text('{"ram_total": 1, "ram_available": 1, "processes": {"pid-1": 5}}')
    with pytest.raises(ValueError, match=r"resources\.json"):
        FakeReader(path).process_gpu_memory()


def test_make_reader_picks_the_fake_only_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "resources.json"
    write_fake(path, HOST)
    assert make_reader(str(path)).read() == HOST
    assert isinstance(make_reader(None), SystemReader)


class FakeNvml:
    """Just enough of pynvml's surface, with knobs to fail."""

    class NVMLError(Exception):
        pass

    def __init__(self, devices: int = 2, init_error: Exception | None = None) -> None:
        self.devices = devices
        self.init_error = init_error
        self.broken: set[int] = set()
        self.shutdowns = 0

    def nvmlInit(self) -> None:
        if self.init_error:
            raise self.init_error

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return self.devices

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return f"GPU-{handle}"

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        return b"Old Driver GPU"

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        if handle in self.broken:
            raise self.NVMLError("GPU is lost")
        return SimpleNamespace(total=24 * GIB, used=(handle + 1) * GIB, free=0)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[Any]:
        if handle in self.broken:
            raise self.NVMLError("GPU is lost")
        return [
            SimpleNamespace(pid=100, usedGpuMemory=GIB),
            SimpleNamespace(pid=200 + handle, usedGpuMemory=None),
        ]


def loadable() -> str | None:
    """The NVML library check of a host with the driver, for a FakeNvml to be used."""
    return None


def test_nvml_reader_without_the_nvml_library_never_imports_pynvml(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(devices=2))
    # The fake would be found; the reader never looks for it without the library.
    assert not NvmlReader(lambda: "NVML Shared Library Not Found").available


def test_nvml_missing_says_whether_the_library_loads() -> None:
    why = nvml_missing("libmodeld-no-such-library.so.1")
    assert why is not None and why.startswith("NVML Shared Library Not Found (")
    assert "libmodeld-no-such-library.so.1" in why
    assert nvml_missing("libc.so.6") is None


def test_nvml_reader_without_the_library_reports_no_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes `import pynvml` raise ImportError.
    monkeypatch.setitem(sys.modules, "pynvml", None)
    reader = NvmlReader(loadable)
    assert not reader.available
    assert reader.gpus() == ()
    assert reader.process_gpu_memory() == {}
    assert SystemReader(reader).read().gpus == ()


def test_nvml_reader_without_a_driver_reports_no_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml(init_error=FakeNvml.NVMLError("Driver Not Loaded"))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert not NvmlReader(loadable).available


def test_nvml_reader_with_zero_gpus_is_unavailable_and_shuts_down(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeNvml(devices=0)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert not NvmlReader(loadable).available
    assert fake.shutdowns == 1


def test_nvml_reader_reads_gpus_and_process_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml(devices=2)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    reader = NvmlReader(loadable)
    assert reader.available
    assert reader.gpus() == (
        GpuView(0, "GPU-0", "Old Driver GPU", 24 * GIB, GIB),
        GpuView(1, "GPU-1", "Old Driver GPU", 24 * GIB, 2 * GIB),
    )
    # Summed over GPUs; pids whose usage the driver withholds are left out.
    assert reader.process_gpu_memory() == {100: 2 * GIB}


def test_nvml_reader_leaves_out_a_failing_gpu_and_recovers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeNvml(devices=2)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    reader = NvmlReader(loadable)
    fake.broken.add(0)
    assert [g.index for g in reader.gpus()] == [1]
    assert reader.process_gpu_memory() == {100: GIB}
    fake.broken.clear()
    assert [g.index for g in reader.gpus()] == [0, 1]
    reader.close()
    assert not reader.available and fake.shutdowns == 1


def test_system_reader_combines_ram_and_gpus(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(devices=1))
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 4096 kB\nMemAvailable: 1024 kB\n")
    reader = SystemReader(NvmlReader(loadable), meminfo)
    assert reader.read() == HostView(
        4096 * 1024, 1024 * 1024, (GpuView(0, "GPU-0", "Old Driver GPU", 24 * GIB, GIB),)
    )
    assert reader.process_gpu_memory() == {100: GIB}
