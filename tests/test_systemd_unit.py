"""The systemd unit verifies, keeps its promises, and the example config parses."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from modeld import config
from modeld.spec import BackendSpec
from modeld.units import parse_duration

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "modeld.service"
GATEWAY_UNIT = ROOT / "systemd" / "modeld-gateway.service"
EXAMPLE = ROOT / "systemd" / "modeld.toml.example"


def directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def verify(unit: Path) -> tuple[int, list[str]]:
    """systemd-analyze verify; returns its exit code and the lines that name the unit."""
    done = subprocess.run(
        ["systemd-analyze", "--man=no", "verify", str(unit)],
        check=False, capture_output=True, text=True, timeout=60, cwd=unit.parent,
    )  # fmt: skip
    lines = (done.stdout + done.stderr).splitlines()
    return done.returncode, [line for line in lines if unit.name in line]


def runnable_copy(tmp_path: Path, text: str, name: str = "modeld.service") -> Path:
    """The unit with ExecStart pointing at a binary that exists here, as verify checks it."""
    modeld = Path(sys.executable).with_name("modeld")
    binary = modeld if modeld.exists() else Path(sys.executable)
    path = tmp_path / name
    path.write_text(text.replace("ExecStart=/opt/modeld/bin/modeld", f"ExecStart={binary}"))
    return path


def test_systemd_analyze_verify_passes(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    broken = runnable_copy(tmp_path, UNIT.read_text() + "NoSuchSetting=1\n", "broken.service")
    code, complaints = verify(broken)
    if code != 0 or not complaints:
        pytest.skip(f"systemd-analyze verify cannot check units here (exit {code})")
    code, complaints = verify(runnable_copy(tmp_path, UNIT.read_text()))
    assert code == 0
    assert complaints == []
    # The gateway's unit orders itself after modeld.service, which verify loads from
    # the same directory.
    gateway = runnable_copy(tmp_path, GATEWAY_UNIT.read_text(), GATEWAY_UNIT.name)
    code, complaints = verify(gateway)
    assert code == 0
    assert complaints == []


def test_gateway_unit_promises() -> None:
    d = directives(GATEWAY_UNIT.read_text())
    assert d["ExecStart"] == ["/opt/modeld/bin/modeld gateway --config /etc/modeld/modeld.toml"]
    assert "modeld.service" in d["After"][0].split()
    assert "modeld.service" in d["Wants"][0].split()
    # modeld's socket is 0660 for group modeld.
    assert d["Group"] == ["modeld"]
    assert d["NoNewPrivileges"] == ["yes"]
    assert d["ProtectSystem"] == ["strict"]
    assert d["Restart"] == ["on-failure"]


def test_unit_promises() -> None:
    d = directives(UNIT.read_text())
    assert d["Type"] == ["notify"]
    assert d["ExecStart"] == ["/opt/modeld/bin/modeld serve --config /etc/modeld/modeld.toml"]
    assert d["User"] == ["modeld"]
    assert d["StateDirectory"] == ["modeld"]
    assert d["RuntimeDirectory"] == ["modeld"]
    assert d["NoNewPrivileges"] == ["yes"]
    assert d["ProtectSystem"] == ["strict"]
    assert d["PrivateTmp"] == ["yes"]
    assert d["KillMode"] == ["mixed"]
    assert d["Restart"] == ["on-failure"]
    assert "WatchdogSec" in d
    assert "PrivateDevices" not in d


def systemd_seconds(value: str) -> float:
    units = {"min": 60.0, "s": 1.0, "ms": 0.001, "h": 3600.0}
    match = re.fullmatch(r"(\d+)(min|ms|s|h)?", value)
    assert match, value
    return int(match[1]) * units[match[2] or "s"]


def test_stop_timeout_covers_the_drain_and_backend_stops() -> None:
    d = directives(UNIT.read_text())
    example = config.load(str(EXAMPLE), env={})
    grace = max(parse_duration(config.DEFAULTS["shutdown_grace"]), example.shutdown_grace) + max(
        [BackendSpec.stop_grace, *(b.stop_grace for b in example.backends.values())]
    )
    assert systemd_seconds(d["TimeoutStopSec"][0]) > grace


def test_example_config_parses_with_every_documented_key() -> None:
    cfg = config.load(str(EXAMPLE), env={})
    assert cfg.listen == ("unix:///run/modeld/modeld.sock", "127.0.0.1:50051")
    assert cfg.state_dir == Path("/var/lib/modeld")
    assert set(cfg.backends) == {"llama-cpp", "vllm"}
    assert cfg.aliases == {"llama.cpp": "llama-cpp"}
    assert cfg.models["llama-3-8b"].min_replicas == 1
    text = EXAMPLE.read_text()
    for key in [*config.TOP, *(k for keys in config.TABLES.values() for k in keys)]:
        assert re.search(rf"^#?{key} = ", text, re.MULTILINE), f"{key} is not in the example"
