"""The package build generates the gRPC stubs from protos/ (they are never committed).

build_py writes them into the wheel's build dir, or, for an editable install, into
daemon/ where the checkout imports them. The stubs a grpcio-tools release generates
need at least its grpcio and protobuf at run time, so the runtime requirements on
those two are taken from the grpcio-tools that built them.
"""

import importlib.util
from importlib import metadata
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("protogen", ROOT / "tools" / "protogen.py")
assert _spec is not None and _spec.loader is not None
protogen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(protogen)

DEPENDENCIES = [
    "aiosqlite>=0.20,<1",
    "aiohttp>=3.9,<4",
    "structlog>=24.1,<27",
    "uvloop>=0.19,<1",
    "grpcio-reflection>=1.66,<2",
    "grpcio-health-checking>=1.66,<2",
    "prometheus_client>=0.20,<1",
    "nvidia-ml-py>=12,<14",
    "asyncpg>=0.29,<1",
]


def stub_runtime() -> list[str]:
    tools = metadata.version("grpcio-tools")
    protobuf = [r for r in metadata.requires("grpcio-tools") or [] if r.startswith("protobuf")]
    return [f"grpcio>={tools},<2", *protobuf]


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        super().run()
        out = ROOT / "daemon" if self.editable_mode else Path(self.build_lib)
        protogen.generate(ROOT / "protos", out)


setup(
    install_requires=[*stub_runtime(), *DEPENDENCIES],
    cmdclass={"build_py": BuildPyWithStubs},
)
