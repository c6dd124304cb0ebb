"""CI: a clean copy of the source builds an sdist, the sdist builds a wheel, and the
wheel installed into a fresh venv outside the checkout serves the demo model.

This is what `pip install .`, `pip wheel .`, `pipx install` and an sdist install do,
with nothing from the checkout on the path: the stubs must come from the build.
Marked `wheel_install` (about a minute; `-m "not wheel_install"` skips it).
"""

import asyncio
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest

from cli_proc import Result, run
from daemon_proc import ECHO_CATALOG, DaemonProc, write_config

ROOT = Path(__file__).resolve().parent.parent
# What a fresh clone has: generated and local files stay behind.
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "_proto", "*.egg-info", "build", "dist", "var", "node_modules",
    "__pycache__", ".*_cache", ".hypothesis", "results",
)  # fmt: skip
pytestmark = [pytest.mark.wheel_install, pytest.mark.timeout(600)]


def clean_env() -> dict[str, str]:
    drop = ("MODELD_", "PYTHONPATH", "VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


async def ok(*argv: str | Path, cwd: Path, limit_s: float = 300) -> Result:
    done = await run(*map(str, argv), env=clean_env(), cwd=cwd, limit_s=limit_s)
    assert done.code == 0, f"{' '.join(map(str, argv))} failed:\n{done.out}\n{done.err}"
    return done


async def build_wheel(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCE)
    dist = tmp_path / "dist"
    await ok(sys.executable, "setup.py", "-q", "sdist", "-d", dist, cwd=src)
    (sdist,) = dist.glob("modeld-*.tar.gz")
    await ok(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", dist, sdist, cwd=dist)
    (wheel,) = dist.glob("modeld-*.whl")
    return wheel


async def test_wheel_from_sdist_serves_the_demo_model_from_a_fresh_venv(tmp_path: Path) -> None:
    wheel = await build_wheel(tmp_path)
    venv = tmp_path / "venv"
    await ok(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    await ok(venv / "bin" / "python", "-m", "pip", "install", "-q", wheel, cwd=tmp_path)
    where = await ok(
        venv / "bin" / "python", "-c", "import modeld._proto, modeld; print(modeld.__file__)",
        cwd=tmp_path,
    )  # fmt: skip
    assert where.out.strip().startswith(str(venv)), where.out

    config, addr = write_config(tmp_path, ECHO_CATALOG)
    proc = await _spawn(venv / "bin" / "modeld", "serve", "--config", config, cwd=tmp_path)
    daemon = DaemonProc(proc, addr, config)
    try:
        await daemon.wait_serving(limit_s=60)
        modeld = venv / "bin" / "modeld"
        routed = await ok(modeld, "route", "echo", "--addr", addr, "--json", cwd=tmp_path)
        lease = json.loads(routed.out)
        assert lease["address"].startswith("127.0.0.1:")
        await ok(modeld, "release", lease["lease_id"], "--addr", addr, cwd=tmp_path)
        assert await daemon.stop(signal.SIGTERM) == 0
    finally:
        await daemon.close()


async def _spawn(*argv: str | Path, cwd: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *map(str, argv),
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env(),
    )
