"""The imported stubs are exactly what protoc makes of protos/ now: never stale."""

from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from grpc_tools import protoc

from modeld._proto.backend import backend_pb2
from modeld._proto.modeld.v1 import modeld_pb2

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("proto", "module"),
    [("modeld/v1/modeld.proto", modeld_pb2), ("backend/backend.proto", backend_pb2)],
)
def test_stub_matches_proto(tmp_path: Path, proto: str, module: object) -> None:
    out = tmp_path / "set.pb"
    include = str(Path(protoc.__file__).parent / "_proto")
    code = protoc.main(
        [
            "protoc",
            f"-Imodeld/_proto={ROOT / 'protos'}",
            f"-I{include}",
            f"--descriptor_set_out={out}",
            str(ROOT / "protos" / proto),
        ]
    )
    assert code == 0
    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    imported = descriptor_pb2.FileDescriptorProto()
    module.DESCRIPTOR.CopyToProto(imported)  # type: ignore[attr-defined]
    fresh.ClearField("source_code_info")
    _drop_json_names(fresh)
    assert imported == fresh, "stubs are stale: run `make proto`"


def _drop_json_names(file: descriptor_pb2.FileDescriptorProto) -> None:
    """protoc records json_name; the runtime descriptor leaves the derived default out."""
    pending = list(file.message_type)
    while pending:
        message = pending.pop()
        pending.extend(message.nested_type)
        for field in message.field:
            field.ClearField("json_name")
