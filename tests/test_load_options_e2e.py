"""Load options reach a LocalAI-style backend: documented names as typed ModelOptions
fields, every other option as a "key:value" entry of Options (real daemon, real backend)."""

import asyncio
import json
from pathlib import Path
from typing import Any

import grpc
import pytest

from daemon_proc import running_daemon
from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld.load_options import FIELDS, Kind

BACKEND = Path(__file__).parent / "backends" / "options_backend.py"
# One name per ModelOptions field (aliases such as ngl would overwrite each other).
NAMES = list({field.name: name for name, field in FIELDS.items()}.values())
UNTYPED = {"max_new_tokens": "77", "pipeline.stage": "a:b", "attn_impl": "sdpa"}


def sample(name: str, kind: Kind, index: int) -> tuple[str, Any]:
    """A distinct value per option: its text in the spec, and what the backend must see."""
    if kind is Kind.INT32:
        return str(1000 + index), 1000 + index
    if kind is Kind.FLOAT:
        return f"{index}.25", index + 0.25
    if kind is Kind.BOOL:
        return "true", True
    if kind is Kind.STRINGS:
        return f"{name}-a, {name}-b", [f"{name}-a", f"{name}-b"]
    if kind is Kind.FLOATS:
        return "0.5,1.75", [0.5, 1.75]
    return f"value of {name}", f"value of {name}"


def catalog(options: dict[str, str]) -> str:
    table = ", ".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in options.items())
    return f"""
[backends.opts]
command = ["{{python}}", "{BACKEND}", "--addr", "{{addr}}"]
stop_grace = "2s"
max_output_line = 65536
[models.opts]
backend = "opts"
options = {{ {table} }}
"""


async def backend_lines(stub: Any, *prefixes: str) -> list[str]:
    """The first line starting with each prefix (prefix removed), waiting for them:
    the backend's output reaches the daemon's log ring a little after Load returns."""
    found: dict[str, str] = {}
    stream = stub.StreamLogs(pb.StreamLogsRequest(model="opts", tail=1000, follow=True))

    async def collect() -> None:
        async for line in stream:
            for prefix in prefixes:
                if line.text.startswith(prefix) and prefix not in found:
                    found[prefix] = line.text.removeprefix(prefix)
            if len(found) == len(prefixes):
                return

    try:
        await asyncio.wait_for(collect(), 30)
    finally:
        stream.cancel()
    return [found[prefix] for prefix in prefixes]


async def test_every_documented_option_reaches_the_backend_typed_or_not(tmp_path: Path) -> None:
    options = dict(UNTYPED)
    expected: dict[str, Any] = {}
    for index, name in enumerate(NAMES):
        field = FIELDS[name]
        options[name], expected[field.name] = sample(name, field.kind, index)
    async with running_daemon(tmp_path, catalog(options)) as d:
        await d.stub.Load(pb.LoadRequest(model="opts", replicas=1), timeout=60)
        parsed, received = await backend_lines(d.stub, "Parsed options: ", "ModelOptions: ")
    assert json.loads(parsed) == UNTYPED
    fields = json.loads(received)
    for field, value in expected.items():
        # float32 on the wire: compare floats approximately, everything else exactly.
        assert fields.get(field) == pytest.approx(value), field
    assert sorted(fields["Options"]) == sorted(f"{k}:{v}" for k, v in UNTYPED.items())
    assert fields["ModelPath"] == str((tmp_path / "models").resolve())
    assert set(fields) == set(expected) | {"Options", "ModelPath"}


@pytest.mark.parametrize(
    ("name", "value", "kind"),
    [
        ("context_size", "big", "int32"),
        ("max_model_len", str(2**31), "int32"),
        ("gpu_memory_utilization", "most", "float"),
        ("cuda", "maybe", "bool"),
        ("lora_scales", "0.5,x", "repeated float"),
    ],
)
async def test_a_badly_typed_option_is_refused_naming_it(
    tmp_path: Path, name: str, value: str, kind: str
) -> None:
    async with running_daemon(tmp_path, catalog({})) as d:
        spec = pb.ModelSpec(name="bad", backend="opts", options={name: value})
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await d.stub.PutModel(pb.PutModelRequest(spec=spec))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"option {name} ({kind})" in (info.value.details() or "")
