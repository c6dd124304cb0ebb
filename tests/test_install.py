"""CI: modeld installs like a Python package and like a service, from a clean source.

A copy of the source (what a fresh clone has) builds an sdist, the sdist builds a
wheel, and that wheel (1) installed into a fresh venv outside the checkout and
(2) installed by `systemd/install.sh` into a temporary root serves and routes the
demo model, with nothing from the checkout on the path: the stubs must come from
the build. The installed unit passes `systemd-analyze verify` with the paths the
install created, and running the install again (an upgrade) keeps /var/lib/modeld
and the edited config. Marked `install` (about a minute; `-m "not install"` skips it).
"""

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cli_proc import Result, run
from daemon_proc import ECHO_CATALOG, DaemonProc, write_config

ROOT = Path(__file__).resolve().parent.parent
INSTALL = ROOT / "systemd" / "install.sh"
# What a fresh clone has: generated and local files stay behind.
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "_proto", "*.egg-info", "build", "dist", "var", "node_modules",
    "__pycache__", ".*_cache", ".hypothesis", "results",
)  # fmt: skip
pytestmark = [pytest.mark.install, pytest.mark.timeout(600)]


def clean_env() -> dict[str, str]:
    drop = ("MODELD_", "PYTHONPATH", "VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


def must(*argv: str | Path, cwd: Path) -> None:
    done = subprocess.run(
        list(map(str, argv)), cwd=cwd, env=clean_env(), capture_output=True, text=True,
        timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"{' '.join(map(str, argv))}:\n{done.stdout}\n{done.stderr}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src") / "modeld"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCE)
    dist = tmp_path_factory.mktemp("dist")
    must(sys.executable, "setup.py", "-q", "sdist", "-d", dist, cwd=src)
    (sdist,) = dist.glob("modeld-*.tar.gz")
    must(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", dist, sdist, cwd=dist)
    (built,) = dist.glob("modeld-*.whl")
    return built


async def ok(*argv: str | Path, cwd: Path, limit_s: float = 300) -> Result:
    done = await run(*map(str, argv), env=clean_env(), cwd=cwd, limit_s=limit_s)
    assert done.code == 0, f"{' '.join(map(str, argv))} failed:\n{done.out}\n{done.err}"
    return done


async def serve_and_route(modeld: Path, tmp_path: Path) -> None:
    """`modeld serve` from an install, a Route and a Release with its CLI, a clean stop."""
    config, addr = write_config(tmp_path, ECHO_CATALOG)
    proc = await asyncio.create_subprocess_exec(
        modeld, "serve", "--config", config, cwd=tmp_path, env=clean_env(),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    daemon = DaemonProc(proc, addr, config)
    try:
        await daemon.wait_serving(limit_s=60)
        routed = await ok(modeld, "route", "echo", "--addr", addr, "--json", cwd=tmp_path)
        lease = json.loads(routed.out)
        assert lease["address"].startswith("127.0.0.1:")
        await ok(modeld, "release", lease["lease_id"], "--addr", addr, cwd=tmp_path)
        assert await daemon.stop(signal.SIGTERM) == 0
    finally:
        await daemon.close()


@pytest.mark.long
async def test_the_wheel_serves_the_demo_model_from_a_fresh_venv(
    wheel: Path, tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    await ok(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    await ok(venv / "bin" / "python", "-m", "pip", "install", "-q", wheel, cwd=tmp_path)
    where = await ok(
        venv / "bin" / "python", "-c", "import modeld._proto, modeld; print(modeld.__file__)",
        cwd=tmp_path,
    )  # fmt: skip
    assert where.out.strip().startswith(str(venv)), where.out
    await serve_and_route(venv / "bin" / "modeld", tmp_path)


def systemd_tools() -> None:
    tools = ("systemd-sysusers", "systemd-tmpfiles", "systemd-analyze")
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (Debian package systemd; .ci/run adds it)")
    if os.geteuid() != 0:
        pytest.skip("systemd/install.sh creates a system user: it needs root")


def verify(root: Path, unit: str) -> tuple[int, str]:
    done = subprocess.run(
        ["systemd-analyze", "--man=no", f"--root={root}", "verify", unit],
        check=False, capture_output=True, text=True, timeout=60, cwd=root,
    )  # fmt: skip
    return done.returncode, done.stdout + done.stderr


@pytest.mark.long
async def test_install_sh_installs_a_service_that_verifies_and_upgrades_in_place(
    wheel: Path, tmp_path: Path
) -> None:
    systemd_tools()
    root = tmp_path / "root"
    done = await ok(INSTALL, "--root", root, "--from", wheel, cwd=tmp_path)
    assert "installed modeld" in done.out
    assert (root / "usr/local/bin/modeld").readlink() == Path("/opt/modeld/bin/modeld")
    assert "modeld:x:" in (root / "etc/passwd").read_text()
    state = root / "var/lib/modeld"
    assert (state / "models").is_dir()
    assert state.stat().st_mode & 0o777 == 0o750
    config = root / "etc/modeld/modeld.toml"
    assert config.stat().st_mode & 0o777 == 0o640

    # The unit, with the paths the install made, checked inside that root (which needs
    # the system's own units, as on a host: targets the unit orders itself after).
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system")
    unit = "/etc/systemd/system/modeld.service"
    code, said = verify(root, unit)
    assert code == 0, said
    code, said = verify(root, "/etc/systemd/system/modeld-gateway.service")
    assert code == 0, said
    (root / "opt/modeld/bin/modeld").rename(root / "opt/modeld/bin/moved")
    code, said = verify(root, unit)
    assert code != 0, "verify must notice that ExecStart does not exist"
    assert "/opt/modeld/bin/modeld" in said
    (root / "opt/modeld/bin/moved").rename(root / "opt/modeld/bin/modeld")

    await serve_and_route(root / "opt/modeld/bin/modeld", tmp_path)

    (state / "modeld.db").write_text("the registry")
    config.write_text(config.read_text() + "# edited by the admin\n")
    await ok(INSTALL, "--root", root, "--from", wheel, cwd=tmp_path)
    assert (state / "modeld.db").read_text() == "the registry"
    assert config.read_text().endswith("# edited by the admin\n")
    await ok(root / "opt/modeld/bin/modeld", "--version", cwd=tmp_path)
