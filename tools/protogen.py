"""Generate the gRPC stubs (`modeld/_proto/...`) from `protos/`.

The one code path for stubs: `make proto` runs this file, and the package build
(setup.py's build_py) imports it, so an installed modeld and a checkout carry stubs
made the same way from the protos they ship with. Needs grpcio-tools.

    python tools/protogen.py [--protos DIR] [--out DIR]   # out: the dir holding modeld/
"""

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = Path("modeld") / "_proto"


def generate(protos: Path, out: Path) -> list[Path]:
    """Replace `out/modeld/_proto` with fresh stubs of every .proto under `protos`."""
    from grpc_tools import protoc  # a build requirement, not a runtime one

    sources = sorted(str(p) for p in protos.rglob("*.proto"))
    if not sources:
        raise SystemExit(f"protogen: no .proto files under {protos}")
    target = out / PACKAGE
    shutil.rmtree(target, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"
    code = protoc.main(
        [
            "protoc",
            f"-I{PACKAGE.as_posix()}={protos}",
            f"-I{include}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            *sources,
        ]
    )
    if code != 0:
        raise SystemExit(f"protogen: protoc failed (exit {code}) on {protos}")
    for folder in [target, *(p for p in target.rglob("*") if p.is_dir())]:
        (folder / "__init__.py").touch()
    return sorted(p for p in target.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protos", type=Path, default=ROOT / "protos")
    parser.add_argument("--out", type=Path, default=ROOT / "daemon")
    args = parser.parse_args(argv)
    generate(args.protos.resolve(), args.out.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
