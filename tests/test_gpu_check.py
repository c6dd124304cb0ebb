"""The parts of bench/gpu (issue 16's GPU check) that need no GPU.

The GPU test backend runs as a real process speaking the backend protocol over real
gRPC, with its pretend device (--fake-gpu-mib) or with PyTorch missing; the script's
judging of figures and its summary are pure and tested directly; and the script
itself, on this machine without a GPU, says so in one line and exits 0.
"""

import asyncio
import contextlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from backend_proc import free_port
from modeld._proto.backend import backend_pb2 as pb
from modeld._proto.backend import backend_pb2_grpc

GPU_BENCH = Path(__file__).resolve().parent.parent / "bench" / "gpu"
sys.path.insert(0, str(GPU_BENCH))

import figures as fig  # noqa: E402
import gpu_backend  # noqa: E402

MIB = 1 << 20
GIB = 1 << 30


# --- the backend's option parsing -------------------------------------------------


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["alloc_mib:512"], 512 * MIB),
        (["alloc_mib=512"], 512 * MIB),
        (["other=x", "alloc_mib: 3 "], 3 * MIB),
        ([], 0),
        (["path:/a=b", "alloc_mib=1"], MIB),
    ],
)
def test_alloc_option_accepts_both_separators(options: list[str], expected: int) -> None:
    assert gpu_backend.alloc_bytes(options) == expected


@pytest.mark.parametrize("options", [["alloc_mib=lots"], ["alloc_mib:-1"], ["novalue"], [":x"]])
def test_bad_alloc_options_are_refused_with_the_option_named(options: list[str]) -> None:
    with pytest.raises(gpu_backend.LoadError, match=r"alloc_mib|load option"):
        gpu_backend.alloc_bytes(options)


def test_uuid_text_formats_raw_bytes_in_the_dashed_form() -> None:
    class Raw:
        bytes = bytes(range(16))

        def __str__(self) -> str:
            return "<raw>"

    assert gpu_backend.uuid_text(Raw()) == "00010203-0405-0607-0809-0a0b0c0d0e0f"
    assert gpu_backend.uuid_text("de4755e7-41f7-fef8-344f-5a7a001fbae1").startswith("de47")
    assert gpu_backend.uuid_text(None) == ""


# --- the PyTorch allocator, against a stand-in that records the calls --------------


class StubCuda:
    def __init__(self, free: int, total: int) -> None:
        self.free, self.total = free, total
        self.calls: list[str] = []

    def is_available(self) -> bool:
        return True

    def init(self) -> None:
        self.calls.append("init")

    def device_count(self) -> int:
        return 1

    def get_device_properties(self, index: int) -> Any:
        class Props:
            uuid = "de4755e7-41f7-fef8-344f-5a7a001fbae1"
            name = "Stub GPU"
            total_memory = self.total
            pci_domain_id, pci_bus_id, pci_device_id = 0, 6, 0

        return Props()

    def mem_get_info(self, index: int) -> tuple[int, int]:
        return self.free, self.total

    def synchronize(self, index: int) -> None:
        self.calls.append("synchronize")

    def empty_cache(self) -> None:
        self.calls.append("empty_cache")


class StubTorch:
    uint8 = "uint8"

    def __init__(self) -> None:
        self.cuda = StubCuda(free=8 * GIB, total=16 * GIB)
        self.allocations: list[tuple[int, str, str]] = []

    def empty(self, n: int, *, dtype: str, device: str) -> object:
        self.allocations.append((n, dtype, device))
        return object()


def test_torch_allocator_allocates_plain_device_memory_and_frees_it() -> None:
    torch = StubTorch()
    alloc = gpu_backend.TorchAllocator(torch)
    info = alloc.init()
    assert (info.device_count, info.name, info.pci) == (1, "Stub GPU", "00:06:00")
    alloc.allocate(GIB)
    assert torch.allocations == [(GIB, "uint8", "cuda:0")]
    alloc.release()
    assert torch.cuda.calls[-1] == "empty_cache"
    assert alloc.init() is info  # the context is created once


# --- the backend as a real process --------------------------------------------------


@contextlib.asynccontextmanager
async def gpu_backend_proc(tmp_path: Path, *args: str) -> AsyncIterator[Any]:
    addr = f"127.0.0.1:{free_port()}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(GPU_BENCH / "gpu_backend.py"),
        "--addr",
        addr,
        "--report-dir",
        str(tmp_path),
        *args,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    channel = grpc.aio.insecure_channel(addr)
    try:
        await asyncio.wait_for(channel.channel_ready(), 20)
        yield backend_pb2_grpc.BackendStub(channel)  # type: ignore[no-untyped-call]
    finally:
        await channel.close()
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 20) == 0


async def test_fake_device_load_status_free(tmp_path: Path) -> None:
    async with gpu_backend_proc(tmp_path, "--fake-gpu-mib", "4096") as stub:
        assert (await stub.Health(pb.HealthMessage())).message == b"OK"
        status = await stub.Status(pb.HealthMessage())
        assert status.state == pb.StatusResponse.UNINITIALIZED

        result = await stub.LoadModel(pb.ModelOptions(Options=["alloc_mib:1024"]))
        assert result.success, result.message
        status = await stub.Status(pb.HealthMessage())
        assert status.state == pb.StatusResponse.READY
        assert status.memory.total == GIB
        assert status.memory.breakdown["device_count"] == 1

        (report_file,) = tmp_path.glob("*.json")
        report = json.loads(report_file.read_text())
        assert report["alloc_bytes"] == GIB
        assert report["uuid"] == gpu_backend.FAKE_UUID
        marks = report["marks"]
        assert 0 < marks["listening"] <= marks["load_begin"] <= marks["alloc_done"]

        assert (await stub.Free(pb.HealthMessage())).success
        status = await stub.Status(pb.HealthMessage())
        assert (status.state, status.memory.total) == (pb.StatusResponse.UNINITIALIZED, 0)


async def test_a_load_larger_than_free_memory_is_refused_and_says_why(tmp_path: Path) -> None:
    async with gpu_backend_proc(tmp_path, "--fake-gpu-mib", "1024") as stub:
        result = await stub.LoadModel(pb.ModelOptions(Options=["alloc_mib=4096"]))
        assert not result.success
        assert "cannot allocate 4096 MiB" in result.message
        assert "free" in result.message
        status = await stub.Status(pb.HealthMessage())
        assert (status.state, status.memory.total) == (pb.StatusResponse.ERROR, 0)
        result = await stub.LoadModel(pb.ModelOptions(Options=["alloc_mib=bad"]))
        assert not result.success and "alloc_mib" in result.message


async def test_without_pytorch_a_load_fails_and_names_it(tmp_path: Path) -> None:
    with contextlib.suppress(ImportError):
        import torch  # noqa: F401

        pytest.skip("PyTorch is installed here")
    async with gpu_backend_proc(tmp_path) as stub:
        result = await stub.LoadModel(pb.ModelOptions(Options=["alloc_mib=1"]))
        assert not result.success
        assert "PyTorch is not installed" in result.message


# --- the script's figures -----------------------------------------------------------


def test_memory_figure_passes_only_on_a_measured_agreeing_view() -> None:
    good = fig.memory_figure(
        alloc=48 * GIB,
        nvml_drop=48 * GIB + 530 * MIB,
        modeld_memory=48 * GIB + 500 * MIB,
        estimate=49 * GIB,
        backend_free_drop=48 * GIB,
    )
    assert good.passed, good.detail
    estimate = fig.memory_figure(
        alloc=GIB, nvml_drop=GIB + 300 * MIB, modeld_memory=2 * GIB, estimate=2 * GIB,
        backend_free_drop=0,
    )  # fmt: skip
    assert not estimate.passed and "memory_estimate" in estimate.detail
    stale = fig.memory_figure(
        alloc=48 * GIB, nvml_drop=48 * GIB + 530 * MIB, modeld_memory=30 * MIB,
        estimate=49 * GIB, backend_free_drop=0,
    )  # fmt: skip
    assert not stale.passed and "modeld shows 30 MiB" in stale.detail
    short = fig.memory_figure(
        alloc=10 * GIB, nvml_drop=5 * GIB, modeld_memory=5 * GIB, estimate=11 * GIB,
        backend_free_drop=0,
    )  # fmt: skip
    assert not short.passed and "NVML fell by" in short.detail


def _report(**changes: Any) -> dict[str, Any]:
    report = {
        "cuda_visible_devices": "0",
        "cuda_device_order": "PCI_BUS_ID",
        "device_count": 1,
        "uuid": "de4755e7-41f7-fef8-344f-5a7a001fbae1",
    }
    return {**report, **changes}


@pytest.mark.parametrize(
    ("changes", "complaint"),
    [
        ({}, None),
        ({"cuda_visible_devices": "1"}, "CUDA_VISIBLE_DEVICES"),
        ({"cuda_device_order": None}, "CUDA_DEVICE_ORDER"),
        ({"device_count": 2}, "2 device(s)"),
        ({"uuid": "0000"}, "NVML's is"),
        ({"pci": "00:00:06"}, None),
        ({"pci": "-1:-1:-1"}, None),
        ({"pci": "00:01:00"}, "PCI address is 00:01:00"),
    ],
)
def test_placement_figure_names_each_disagreement(
    changes: dict[str, Any], complaint: str | None
) -> None:
    figure = fig.placement_figure(
        modeld_gpu="0",
        report=_report(**changes),
        nvml_uuids=["GPU-de4755e7-41f7-fef8-344f-5a7a001fbae1"],
        nvml_pci=["00000000:00:06.0"],
    )
    assert figure.passed is (complaint is None)
    if complaint is not None:
        assert complaint in figure.detail


def test_cold_split_adds_up_and_flags_marks_out_of_order() -> None:
    marks = {
        "proc_start": 10.01,
        "import_start": 10.05,
        "imports_done": 10.2,
        "torch_imported": 13.9,
        "listening": 14.0,
        "load_begin": 14.02,
        "cuda_ready": 14.4,
        "alloc_done": 14.41,
    }
    figure = fig.timing_figure(10.0, 14.42, marks)
    assert figure.passed, figure.detail
    split = figure.values["split_s"]
    assert sum(split.values()) == pytest.approx(figure.values["total_s"], abs=1e-3)
    assert split["CUDA init (context)"] == pytest.approx(0.38)
    assert split["torch import"] == pytest.approx(3.7)
    no_torch = fig.timing_figure(10.0, 14.42, {**marks, "torch_imported": 0.0})
    assert no_torch.passed and "torch import" not in no_torch.values["split_s"]
    late = fig.timing_figure(10.0, 14.42, {**marks, "cuda_ready": 13.9})
    assert not late.passed and "out of order" in late.detail
    missing = fig.timing_figure(10.0, 14.42, {k: v for k, v in marks.items() if k != "listening"})
    assert not missing.passed and "listening" in missing.detail


def test_summary_passes_only_with_all_five_figures_passing() -> None:
    five = [fig.Figure(n, f"f{n}", True, "ok") for n in range(1, 6)]
    assert fig.summary(five, {})["passed"]
    assert not fig.summary(five[:4], {})["passed"]
    assert fig.summary(five[:4], {})["missing"] == [5]
    failing = [*five[:4], fig.Figure(5, "f5", False, "slow")]
    result = json.loads(fig.dumps(fig.summary(failing, {"gpu": "x"})))
    assert not result["passed"]
    assert [f.number for f in fig.figure_list(result)] == [1, 2, 3, 4, 5]
    lines = fig.render(fig.figure_list(result)).splitlines()
    assert lines[0].startswith("[PASS] 1. f1") and lines[4] == "[FAIL] 5. f5: slow"


def test_steps_figure_fails_on_any_failed_step_and_on_none() -> None:
    ok = fig.Step("a", True, "fine")
    bad = fig.Step("b", False, "broken")
    assert fig.steps_figure(3, "x", [ok]).passed
    failed = fig.steps_figure(3, "x", [ok, bad])
    assert not failed.passed and failed.detail == "b: broken"
    assert not fig.steps_figure(3, "x", []).passed


# --- the script where there is no GPU ------------------------------------------------


def test_without_a_gpu_the_script_says_so_in_one_line_and_exits_0(tmp_path: Path) -> None:
    gpu = subprocess.run(["nvidia-smi", "-L"], capture_output=True, check=False) if (
        Path("/usr/bin/nvidia-smi").exists()
    ) else None  # fmt: skip
    if gpu is not None and gpu.returncode == 0:
        pytest.skip("this machine has an NVIDIA GPU")
    run = subprocess.run(
        [sys.executable, str(GPU_BENCH / "gpu_check.py"), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("\n") == 1
    assert run.stdout.startswith("gpu_check: no NVIDIA GPU here")
    assert "nothing checked" in run.stdout
    assert not (tmp_path / "out").exists()
