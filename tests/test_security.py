"""TLS, mutual TLS and bearer tokens against real grpc.aio servers; listen address checks."""

import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from modeld.api.security import TokenAuth, check_listen_security, server_credentials, token_auth
from modeld.config.secrets import load_tokens
from modeld.errors import ConfigError
from pki import have_openssl, make_pki

WAIT = 5.0
TOKEN = "a-right-token-0123456789abcdef"
OTHER_TOKEN = "another-token-0123456789abcdef"
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not have_openssl():
        pytest.skip("the openssl command is not installed; it makes the test certificates")
    return make_pki(tmp_path_factory.mktemp("pki"))


@asynccontextmanager
async def serve(
    creds: grpc.ServerCredentials | None = None, interceptor: TokenAuth | None = None
) -> AsyncIterator[str]:
    server = grpc.aio.server(interceptors=[interceptor] if interceptor else None)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection((HEALTH, reflection.SERVICE_NAME), server)
    bind = "127.0.0.1:0"
    port = server.add_secure_port(bind, creds) if creds else server.add_insecure_port(bind)
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


async def check(
    channel: grpc.aio.Channel, metadata: Sequence[tuple[str, str]] = ()
) -> grpc.StatusCode:
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        await stub.Check(health_pb2.HealthCheckRequest(), timeout=WAIT, metadata=metadata)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def tls_channel(addr: str, pki: Path, client_cert: bool) -> grpc.aio.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=(pki / "ca.crt").read_bytes(),
        private_key=(pki / "client.key").read_bytes() if client_cert else None,
        certificate_chain=(pki / "client.crt").read_bytes() if client_cert else None,
    )
    return grpc.aio.secure_channel(addr, creds)


async def test_tls_serves_tls_clients_and_refuses_plaintext(pki: Path) -> None:
    creds = server_credentials(pki / "server.crt", pki / "server.key", None)
    assert creds is not None
    async with serve(creds) as addr:
        async with tls_channel(addr, pki, client_cert=False) as channel:
            assert await check(channel) == grpc.StatusCode.OK
        async with grpc.aio.insecure_channel(addr) as channel:
            assert await check(channel) == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_needs_a_client_certificate(pki: Path) -> None:
    creds = server_credentials(pki / "server.crt", pki / "server.key", pki / "ca.crt")
    async with serve(creds) as addr:
        async with tls_channel(addr, pki, client_cert=True) as channel:
            assert await check(channel) == grpc.StatusCode.OK
        async with tls_channel(addr, pki, client_cert=False) as channel:
            assert await check(channel) == grpc.StatusCode.UNAVAILABLE


def test_server_credentials_settings(pki: Path, tmp_path: Path) -> None:
    assert server_credentials(None, "", None) is None
    with pytest.raises(ConfigError, match="set together"):
        server_credentials(pki / "server.crt", None, None)
    with pytest.raises(ConfigError, match="TLS is off"):
        server_credentials(None, None, pki / "ca.crt")
    with pytest.raises(ConfigError, match=r"tls_key .*missing\.key"):
        server_credentials(pki / "server.crt", tmp_path / "missing.key", None)
    with pytest.raises(ConfigError, match="tls_cert: not a PEM file"):
        server_credentials(pki / "server.key", pki / "server.key", None)


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"# who: ci\n\n{OTHER_TOKEN}\n  {TOKEN}  \n")
    path.chmod(0o600)
    return path


async def test_token_auth_refuses_missing_malformed_and_wrong_tokens(token_file: Path) -> None:
    auth = token_auth(token_file, open_health=False, open_reflection=False)
    async with serve(interceptor=auth) as addr, grpc.aio.insecure_channel(addr) as channel:
        with structlog.testing.capture_logs() as logs:
            missing = await check(channel)
            malformed = await check(channel, [("authorization", f"Basic {TOKEN}")])
            wrong = await check(channel, [("authorization", f"Bearer {TOKEN}x")])
            right = await check(channel, [("authorization", f"Bearer {TOKEN}")])
            other = await check(channel, [("authorization", f"bearer {OTHER_TOKEN}")])
    unauthenticated = grpc.StatusCode.UNAUTHENTICATED
    assert (missing, malformed, wrong) == (unauthenticated,) * 3
    assert (right, other) == (grpc.StatusCode.OK,) * 2
    assert [e["reason"] for e in logs if e["event"] == "auth_denied"] == [
        "missing", "malformed", "invalid"
    ]  # fmt: skip
    assert TOKEN not in repr(logs)
    assert OTHER_TOKEN not in repr(logs)


async def test_denial_says_what_to_send(token_file: Path) -> None:
    auth = token_auth(token_file, open_health=False, open_reflection=False)
    async with serve(interceptor=auth) as addr, grpc.aio.insecure_channel(addr) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=WAIT
            )
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer <token>" in (caught.value.details() or "")


async def reflect(channel: grpc.aio.Channel, metadata: Sequence[tuple[str, str]]) -> object:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(timeout=WAIT, metadata=metadata)
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    await call.done_writing()
    try:
        return (await call.read()).list_services_response.service[0].name
    except grpc.aio.AioRpcError as exc:
        return exc.code()


async def watch(channel: grpc.aio.Channel) -> object:
    call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=WAIT)
    try:
        return (await call.read()).status
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    finally:
        call.cancel()


async def test_open_prefixes_and_streaming_methods(token_file: Path) -> None:
    unauthenticated = grpc.StatusCode.UNAUTHENTICATED
    closed = token_auth(token_file, open_health=False, open_reflection=False)
    async with serve(interceptor=closed) as addr, grpc.aio.insecure_channel(addr) as channel:
        assert await watch(channel) == unauthenticated
        assert await reflect(channel, []) == unauthenticated
        assert await reflect(channel, [("authorization", f"Bearer {TOKEN}")]) == HEALTH
    opened = token_auth(token_file, open_health=True, open_reflection=True)
    async with serve(interceptor=opened) as addr, grpc.aio.insecure_channel(addr) as channel:
        assert await check(channel) == grpc.StatusCode.OK
        assert await watch(channel) == health_pb2.HealthCheckResponse.SERVING
        assert await reflect(channel, []) == HEALTH


async def test_unknown_methods_are_refused_before_they_are_looked_up(token_file: Path) -> None:
    auth = token_auth(token_file, open_health=True, open_reflection=True)
    async with serve(interceptor=auth) as addr, grpc.aio.insecure_channel(addr) as channel:
        method = channel.unary_unary(
            "/nope.Service/Method", request_serializer=bytes, response_deserializer=bytes
        )
        codes = []
        for metadata in ((), (("authorization", f"Bearer {TOKEN}"),)):
            try:
                await method(b"", timeout=WAIT, metadata=metadata)
            except grpc.aio.AioRpcError as exc:
                codes.append(exc.code())
    assert codes == [grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNIMPLEMENTED]


def test_load_tokens(tmp_path: Path, token_file: Path) -> None:
    assert load_tokens(token_file) == (OTHER_TOKEN.encode(), TOKEN.encode())
    empty = tmp_path / "empty"
    empty.write_text("# nothing yet\n\n")
    with pytest.raises(ConfigError, match="no tokens"):
        load_tokens(empty)
    short = tmp_path / "short"
    short.write_text("secret\n")
    with pytest.raises(ConfigError, match="token 1 must be at least 16") as caught:
        load_tokens(short)
    assert "secret" not in str(caught.value)
    with pytest.raises(ConfigError, match=r"auth_token_file .*absent"):
        load_tokens(tmp_path / "absent")
    assert token_auth("", open_health=True, open_reflection=True) is None


@pytest.mark.parametrize(
    "listen",
    [
        ["127.0.0.1:50051"],
        ["127.8.9.10:1"],
        ["[::1]:50051"],
        ["localhost:50051"],
        ["unix:///run/modeld/modeld.sock", "unix:relative.sock", "unix-abstract:modeld"],
    ],
)
def test_local_addresses_need_no_protection(listen: list[str]) -> None:
    check_listen_security(listen, tls_enabled=False, token_enabled=False,
                          allow_insecure_remote=False)  # fmt: skip


@pytest.mark.parametrize(
    "address", ["0.0.0.0:50051", "[::]:50051", ":50051", "10.1.2.3:50051", "gpu-host:50051"]
)
def test_remote_addresses_need_tls_a_token_or_explicit_consent(address: str) -> None:
    listen = ["127.0.0.1:50051", address]
    with pytest.raises(ConfigError, match=re.escape(f"listen: {address} can be reached")):
        check_listen_security(listen, tls_enabled=False, token_enabled=False,
                              allow_insecure_remote=False)  # fmt: skip
    for tls, token, allow in ((True, False, False), (False, True, False), (False, False, True)):
        check_listen_security(listen, tls_enabled=tls, token_enabled=token,
                              allow_insecure_remote=allow)  # fmt: skip
