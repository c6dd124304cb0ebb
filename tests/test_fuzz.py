"""API fuzzing against one real daemon: every answer is OK or a precise client error.

Hypothesis builds valid protobuf requests for every method of
`modeld.v1.ModelControl` from the message descriptors (strings empty, huge,
unicode, control characters, `../`, NUL; numbers negative and extreme; unknown
enum values; out-of-range Durations; both members of a oneof), and raw bytes
that are not protobuf at all. A handler must never answer INTERNAL or UNKNOWN,
nor hide a bug behind UNAVAILABLE ("unexpected error" in the daemon's log), and
the daemon must still be SERVING afterwards.

The daemon is shared by the whole module (one start); the only backend a fuzzed
spec may name starts and fails at once, so fuzzing cannot pile up processes.
"""

import json
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from daemon_proc import write_config
from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld.api.leasing import MAX_AFFINITY_KEY
from modeld.api.servicer import (
    MAX_DRAIN_S,
    MAX_LOG_TAIL,
    MAX_REPLICAS_PER_LOAD,
)
from modeld.spec import (
    MAX_GROUPS,
    MAX_NAME_LEN,
    MAX_OPTION_LEN,
    MAX_OPTIONS,
    MAX_OPTIONS_BYTES,
    MAX_PATH_LEN,
)

MAX_MESSAGE = 1 << 20
CONFIG = f"""
max_message_bytes = {MAX_MESSAGE}
[routing]
lease_ttl = "3s"
[backends.echo]
command = ["{{python}}", "-m", "modeld.backends.echo", "--addr", "{{addr}}"]
stop_grace = "1s"
[backends.nostart]
command = ["{{python}}", "-c", "raise SystemExit(3)"]
start_attempts = 1
[models.echo]
backend = "echo"
max_replicas = 2
"""
SERVICE = pb.DESCRIPTOR.services_by_name["ModelControl"]
CLIENT_ERRORS = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)
UNARY_LIMIT_S = 1.0
STREAM_LIMIT_S = 0.2
STREAM_ITEMS = 50


@dataclass
class FuzzDaemon:
    proc: "subprocess.Popen[bytes]"
    channel: grpc.Channel
    log_path: Path

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def check_healthy(self) -> None:
        assert self.proc.poll() is None, f"daemon exited with {self.proc.returncode}"
        health = health_pb2_grpc.HealthStub(self.channel)  # type: ignore[no-untyped-call]
        reply = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        unexpected = [e for e in self.events() if e.get("event") == "rpc_unexpected_error"]
        assert not unexpected, unexpected[:3]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzDaemon]:
    tmp = tmp_path_factory.mktemp("fuzz")
    config, addr = write_config(tmp, CONFIG)
    log_path = tmp / "daemon.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "modeld.cli.main", "serve", "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    channel = grpc.insecure_channel(addr)
    try:
        health = health_pb2_grpc.HealthStub(channel)  # type: ignore[no-untyped-call]
        health.Check(health_pb2.HealthCheckRequest(), wait_for_ready=True, timeout=20)
        yield FuzzDaemon(proc, channel, log_path)
    finally:
        channel.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        assert proc.returncode == 0, f"the fuzzed daemon exited with {proc.returncode}"


# Strategies, built from the descriptors so that every field of every request is
# covered. Each request draws a wildness: a tame field holds a plausible value (a
# known model, a small count), so that valid requests reach deep into the daemon;
# a wild one holds anything its wire type allows.

SPECIAL_STRINGS = [
    "",
    "echo",
    "nostart",
    "fz-a",
    "../etc/passwd",
    "a/../b",
    "/etc/passwd",
    "~root",
    "..",
    "a\x00b",
    "\x00",
    "line\nbreak",
    "\x1b[31mred",
    "\u202eevil",
    "é" * 200,
    "💥" * 50,
    " echo",
    "echo ",
    "x" * MAX_NAME_LEN,
    "x" * (MAX_NAME_LEN + 1),
    "v" * MAX_OPTION_LEN,
    "v" * (MAX_OPTION_LEN + 1),
    "z" * 100_000,
    "h" * (MAX_MESSAGE + 1),
]
WILD_STRINGS = st.one_of(
    st.sampled_from(SPECIAL_STRINGS), st.text(max_size=40), st.text(max_size=300)
)
NAMES = st.sampled_from(["echo", "fz-a", "fz-b", "fz.c:1@x/y+z", "q" * MAX_NAME_LEN])


def _ints(bits: int, signed: bool) -> st.SearchStrategy[int]:
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    edges = [v for v in (0, 1, -1, 2, 16, 17, 64, 65, 1024, 10_000, 10_001) if low <= v <= high]
    return st.one_of(st.sampled_from([*edges, low, high]), st.integers(low, high))


WILD: dict[int, st.SearchStrategy[Any]] = {
    FieldDescriptor.TYPE_STRING: WILD_STRINGS,
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_INT32: _ints(32, True),
    FieldDescriptor.TYPE_INT64: _ints(64, True),
    FieldDescriptor.TYPE_UINT64: _ints(64, False),
    FieldDescriptor.TYPE_DOUBLE: st.floats(allow_nan=True, allow_infinity=True),
    # Open proto3 enums: unknown numbers are valid on the wire.
    FieldDescriptor.TYPE_ENUM: _ints(32, True),
}
TAME: dict[int, st.SearchStrategy[Any]] = {
    FieldDescriptor.TYPE_STRING: NAMES,
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_INT32: st.integers(0, 3),
    FieldDescriptor.TYPE_INT64: st.integers(0, 100),
    FieldDescriptor.TYPE_UINT64: st.integers(0, 1 << 30),
    FieldDescriptor.TYPE_DOUBLE: st.floats(0, 1),
}
# A fuzzed spec may only name a backend that fails at once (or none that exists),
# so fuzzing cannot pile up processes.
BACKENDS = st.sampled_from(["nostart", "", "/bin/sh", "../echo", "NOSTART", "x" * 200])
FIELDS_TAME: dict[tuple[str, str], st.SearchStrategy[Any]] = {
    ("ModelSpec", "backend"): st.just("nostart"),
    ("ModelSpec", "model_file"): st.sampled_from(["", "m.bin", "sub/m.gguf"]),
    ("OptionsEntry", "key"): st.sampled_from(["context_size", "threads", "x_y", "load_delay"]),
    ("OptionsEntry", "value"): st.text(max_size=20),
    ("Duration", "nanos"): st.integers(0, 999_999_999),
    ("Settings", "max_loaded"): st.integers(1, 4),
}
FIELDS_WILD: dict[tuple[str, str], st.SearchStrategy[Any]] = {
    ("ModelSpec", "backend"): BACKENDS,
    # Well-formed Durations and Timestamps have |seconds| <= 315,576,000,000.
    ("Duration", "seconds"): _ints(64, True),
}


def _strategy(owner: Descriptor, field: FieldDescriptor, wild: bool) -> st.SearchStrategy[Any]:
    key = (owner.name, field.name)
    if wild:
        return FIELDS_WILD.get(key, WILD[field.type])
    if key in FIELDS_TAME:
        return FIELDS_TAME[key]
    if field.type == FieldDescriptor.TYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values])
    return TAME[field.type]


@st.composite
def requests(draw: st.DrawFn, cls: type[Message]) -> Message:
    wildness = draw(st.sampled_from([0.0, 0.0, 0.1, 0.3, 1.0]))
    return draw(messages(cls, wildness))


@st.composite
def messages(draw: st.DrawFn, cls: type[Message], wildness: float) -> Message:
    """A message of `cls`: a tame one sets every field (the first member of a oneof)."""
    msg = cls()
    for field in cls.DESCRIPTOR.fields:
        oneof = field.containing_oneof
        if oneof is not None and msg.WhichOneof(oneof.name) is not None and wildness == 0:
            continue
        if draw(st.floats(0, 1)) < 1 - wildness / 2:
            _fill(draw, msg, field, wildness)
    return msg


def _fill(draw: st.DrawFn, msg: Message, field: FieldDescriptor, wildness: float) -> None:
    def value(owner: Descriptor, of: FieldDescriptor) -> st.SearchStrategy[Any]:
        return _strategy(owner, of, draw(st.floats(0, 1)) < wildness)

    target = getattr(msg, field.name)
    entry = field.message_type
    if entry is not None and entry.GetOptions().map_entry:
        key_field, value_field = entry.fields
        keys, values = value(entry, key_field), value(entry, value_field)
        target.update(draw(st.dictionaries(keys, values, max_size=MAX_OPTIONS + 2)))
    elif field.is_repeated:
        target.extend(draw(st.lists(value(msg.DESCRIPTOR, field), max_size=MAX_GROUPS + 2)))
    elif entry is not None:
        target.CopyFrom(draw(messages(type(target), wildness)))
    else:
        setattr(msg, field.name, draw(value(msg.DESCRIPTOR, field)))


def _call(channel: grpc.Channel, method: Any, request: Message) -> tuple[grpc.StatusCode, str]:
    path = f"/{SERVICE.full_name}/{method.name}"
    response = getattr(pb, method.output_type.name)
    try:
        if method.client_streaming:
            return _stream_answer(channel, path, request.SerializeToString())
        if method.server_streaming:
            stream = channel.unary_stream(
                path,
                request_serializer=type(request).SerializeToString,
                response_deserializer=response.FromString,
            )(request, timeout=STREAM_LIMIT_S)
            for number, _ in enumerate(stream):
                if number >= STREAM_ITEMS:
                    stream.cancel()
                    break
        else:
            channel.unary_unary(
                path,
                request_serializer=type(request).SerializeToString,
                response_deserializer=response.FromString,
            )(request, timeout=UNARY_LIMIT_S)
    except grpc.RpcError as exc:
        if exc.code() is grpc.StatusCode.CANCELLED:
            return grpc.StatusCode.OK, ""
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def _assert_precise(method: str, code: grpc.StatusCode, details: str, request: Any) -> None:
    shown = str(request)[:300]
    assert code in CLIENT_ERRORS, f"{method} answered {code.name}: {details[:300]} for {shown}"
    assert "unexpected error" not in details, f"{method} hid a bug: {details} for {shown}"


METHODS = {m.name: m for m in SERVICE.methods}
# One request per method that must succeed, so every run reaches the success paths.
VALID: dict[str, Message] = {
    "Route": pb.RouteRequest(model="echo"),
    "Load": pb.LoadRequest(model="echo", replicas=1),
    "Unload": pb.UnloadRequest(model="fz-b", force=True),
    "Health": pb.HealthRequest(model="echo", probe=True),
    "PutModel": pb.PutModelRequest(
        spec=pb.ModelSpec(name="fz-b", backend="nostart", options={"threads": "2"})
    ),
    "DeleteModel": pb.DeleteModelRequest(name="fz-b"),
    "ListReplicas": pb.ListReplicasRequest(model="echo"),
    "UpdateSettings": pb.UpdateSettingsRequest(settings=pb.Settings(max_loaded=3)),
    "StreamLogs": pb.StreamLogsRequest(model="echo", tail=MAX_LOG_TAIL),
}
# Methods that may start backends or stream until the deadline get fewer examples.
EXAMPLES = {"Route": 25, "Load": 25, "StreamLogs": 15, "WatchEvents": 10}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_random_requests_get_precise_answers(daemon: FuzzDaemon, name: str) -> None:
    method = METHODS[name]
    request_cls = getattr(pb, method.input_type.name)
    seen: set[grpc.StatusCode] = set()

    @settings(
        max_examples=EXAMPLES.get(name, 40),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(request=requests(request_cls))
    @example(request=VALID.get(name, request_cls()))
    def fuzz(request: Message) -> None:
        code, details = _call(daemon.channel, method, request)
        seen.add(code)
        _assert_precise(name, code, details, request)

    fuzz()
    assert seen, "hypothesis ran no examples"
    daemon.check_healthy()


GARBAGE = [
    b"\xff\xff\xff",
    b"\x0a\xff",
    b"\x08",
    b"\x0a\x05abc",
    b"\x0f",
    b"\x0a\x80\x80\x80\x80\x10",
    b"\x0b",
    b"\x12\x01",
]


def test_known_garbage_is_invalid_argument(daemon: FuzzDaemon) -> None:
    for name, method in METHODS.items():
        request_cls = getattr(pb, method.input_type.name)
        for payload in GARBAGE:
            with pytest.raises(DecodeError):
                request_cls.FromString(payload)
            code, details = _raw_call(daemon.channel, method, payload)
            assert code is grpc.StatusCode.INVALID_ARGUMENT, (name, payload, code, details)
            assert f"not a valid {method.input_type.full_name}" in details, details
    daemon.check_healthy()


def _raw_call(channel: grpc.Channel, method: Any, payload: bytes) -> tuple[grpc.StatusCode, str]:
    path = f"/{SERVICE.full_name}/{method.name}"
    identity: Callable[[bytes], bytes] = lambda data: data  # noqa: E731
    try:
        if method.client_streaming:
            return _stream_answer(channel, path, payload)
        if method.server_streaming:
            stream = channel.unary_stream(
                path, request_serializer=identity, response_deserializer=identity
            )(payload, timeout=STREAM_LIMIT_S)
            for _ in stream:
                stream.cancel()
                break
        else:
            channel.unary_unary(path, request_serializer=identity, response_deserializer=identity)(
                payload, timeout=UNARY_LIMIT_S
            )
    except grpc.RpcError as exc:
        if exc.code() is grpc.StatusCode.CANCELLED:
            return grpc.StatusCode.OK, ""
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def _stream_answer(channel: grpc.Channel, path: str, payload: bytes) -> tuple[grpc.StatusCode, str]:
    """RouteStream answers a message in the stream: its StreamError carries the status
    name and text a unary call would end with."""
    identity: Callable[[bytes], bytes] = lambda data: data  # noqa: E731
    stream = channel.stream_stream(
        path, request_serializer=identity, response_deserializer=identity
    )(iter([payload]), timeout=STREAM_LIMIT_S)
    for raw in stream:
        stream.cancel()
        answer = pb.RouteStreamResponse.FromString(raw)
        if answer.WhichOneof("result") == "error":
            return grpc.StatusCode[answer.error.code], answer.error.message
        break
    return grpc.StatusCode.OK, ""


@settings(max_examples=60, deadline=None, database=None)
@given(name=st.sampled_from(sorted(METHODS)), payload=st.binary(max_size=200))
def test_random_bytes_never_crash_a_handler(daemon: FuzzDaemon, name: str, payload: bytes) -> None:
    code, details = _raw_call(daemon.channel, METHODS[name], payload)
    _assert_precise(name, code, details, payload)


def test_daemon_serves_after_fuzzing(daemon: FuzzDaemon) -> None:
    daemon.check_healthy()
    stub_ping = daemon.channel.unary_unary(
        f"/{SERVICE.full_name}/Ping",
        request_serializer=pb.PingRequest.SerializeToString,
        response_deserializer=pb.PingResponse.FromString,
    )
    assert isinstance(stub_ping(pb.PingRequest(), timeout=5), pb.PingResponse)


# Limits (README "Limits"): each at the limit is accepted, one past it is refused.


def _spec(name: str = "lim", **fields: Any) -> pb.PutModelRequest:
    return pb.PutModelRequest(spec=pb.ModelSpec(name=name, backend="nostart", **fields))


def _options(count: int, size: int) -> dict[str, str]:
    return {f"k{i}": "v" * size for i in range(count)}


def _drain(seconds: int) -> pb.UnloadRequest:
    request = pb.UnloadRequest(model="echo")
    request.drain_timeout.seconds = seconds
    return request


LIMITS: list[tuple[str, Message, Message, str]] = [
    ("PutModel", _spec("n" * MAX_NAME_LEN), _spec("n" * (MAX_NAME_LEN + 1)), "limit is 128"),
    (
        "PutModel",
        _spec(options=_options(MAX_OPTIONS, 10)),
        _spec(options=_options(MAX_OPTIONS + 1, 10)),
        f"more than {MAX_OPTIONS} options",
    ),
    (
        "PutModel",
        _spec(options={"k": "v" * MAX_OPTION_LEN}),
        _spec(options={"k": "v" * (MAX_OPTION_LEN + 1)}),
        f"longer than {MAX_OPTION_LEN}",
    ),
    (
        "PutModel",
        _spec(options=_options(4, MAX_OPTION_LEN - 2)),
        _spec(options=_options(5, MAX_OPTION_LEN - 2)),
        f"more than {MAX_OPTIONS_BYTES} characters",
    ),
    ("PutModel", _spec(options={"a.b-c_d": "1"}), _spec(options={"a=b": "1"}), "option name"),
    (
        "PutModel",
        _spec(groups=[f"g{i}" for i in range(MAX_GROUPS)]),
        _spec(groups=[f"g{i}" for i in range(MAX_GROUPS + 1)]),
        f"more than {MAX_GROUPS} groups",
    ),
    (
        "PutModel",
        _spec(groups=["g" * MAX_NAME_LEN]),
        _spec(groups=["g" * (MAX_NAME_LEN + 1)]),
        "group name",
    ),
    (
        "PutModel",
        _spec(model_file="m" * MAX_PATH_LEN),
        _spec(model_file="m" * (MAX_PATH_LEN + 1)),
        f"longer than {MAX_PATH_LEN}",
    ),
    (
        "StreamLogs",
        pb.StreamLogsRequest(model="echo", tail=MAX_LOG_TAIL),
        pb.StreamLogsRequest(model="echo", tail=MAX_LOG_TAIL + 1),
        f"tail must be 0..{MAX_LOG_TAIL}",
    ),
    (
        "Load",
        pb.LoadRequest(model="nolimit", replicas=MAX_REPLICAS_PER_LOAD),
        pb.LoadRequest(model="nolimit", replicas=MAX_REPLICAS_PER_LOAD + 1),
        f"replicas must be 0..{MAX_REPLICAS_PER_LOAD}",
    ),
    (
        "Unload",
        _drain(int(MAX_DRAIN_S)),
        _drain(int(MAX_DRAIN_S) + 1),
        "drain_timeout must be at most",
    ),
    (
        "Route",
        pb.RouteRequest(model="nolimit", affinity_key="k" * MAX_AFFINITY_KEY),
        pb.RouteRequest(model="nolimit", affinity_key="k" * (MAX_AFFINITY_KEY + 1)),
        f"the limit is {MAX_AFFINITY_KEY}",
    ),
]


@pytest.mark.parametrize(("method", "at_limit", "past_limit", "needle"), LIMITS)
def test_limits_accept_the_limit_and_refuse_one_more(
    daemon: FuzzDaemon, method: str, at_limit: Message, past_limit: Message, needle: str
) -> None:
    code, details = _call(daemon.channel, METHODS[method], at_limit)
    # "nolimit" is not a model: a Load at the replica limit passes validation, then 404s.
    assert code in (grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND), (code, details)
    code, details = _call(daemon.channel, METHODS[method], past_limit)
    assert code is grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert needle in details, details


def test_oversized_messages_are_refused_by_size(daemon: FuzzDaemon) -> None:
    # Past max_message_bytes gRPC refuses the message before any handler runs.
    code, details = _call(
        daemon.channel, METHODS["Route"], pb.RouteRequest(model="h" * MAX_MESSAGE)
    )
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
    assert "larger than max" in details
    # Under it, the field limits refuse it as an invalid argument.
    big = _spec(options={"k": "v" * (MAX_MESSAGE // 2)})
    code, details = _call(daemon.channel, METHODS["PutModel"], big)
    assert code is grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    daemon.check_healthy()


def test_list_models_stays_under_the_message_limit(daemon: FuzzDaemon) -> None:
    """Specs at the option limit: a listing of many still fits in one message."""
    names = [f"wide-{i}" for i in range(20)]
    for name in names:
        code, details = _call(
            daemon.channel, METHODS["PutModel"], _spec(name, options=_options(4, 4000))
        )
        assert code is grpc.StatusCode.OK, details
    code, details = _call(daemon.channel, METHODS["ListModels"], pb.ListModelsRequest())
    assert code is grpc.StatusCode.OK, details
    for name in names:
        _call(daemon.channel, METHODS["DeleteModel"], pb.DeleteModelRequest(name=name))
