"""TLS, mutual TLS and bearer tokens through the real daemon, from Python, the CLI and grpcurl."""

import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest

from backend_proc import free_port
from cli_proc import modeld
from daemon_proc import DaemonProc, start_daemon, write_config
from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld._proto.modeld.v1 import modeld_pb2_grpc as pb_grpc
from pki import have_openssl, make_pki

TOKEN = "the-right-token-0123456789abcdef"
WRONG = "a-wrong-token-0123456789abcdefgh"
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not have_openssl():
        pytest.skip("the openssl command is not installed; it makes the test certificates")
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tokens(tmp_path: Path) -> tuple[Path, Path]:
    right, wrong = tmp_path / "token", tmp_path / "wrong-token"
    right.write_text(f"# the CI client\n{TOKEN}\n")
    wrong.write_text(WRONG + "\n")
    for path in (right, wrong):
        path.chmod(0o600)
    return right, wrong


def tls_creds(pki: Path, client_cert: bool = False) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=(pki / "ca.crt").read_bytes(),
        private_key=(pki / "client.key").read_bytes() if client_cert else None,
        certificate_chain=(pki / "client.crt").read_bytes() if client_cert else None,
    )


async def list_models(
    channel: grpc.aio.Channel, metadata: Sequence[tuple[str, str]] = ()
) -> grpc.StatusCode:
    stub = pb_grpc.ModelControlStub(channel)  # type: ignore[no-untyped-call]
    try:
        await stub.ListModels(pb.ListModelsRequest(), timeout=5, metadata=metadata)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


async def grpcurl(*args: str) -> tuple[int, str]:
    binary = Path(sys.executable).with_name("grpcurl")
    proc = await asyncio.create_subprocess_exec(
        str(binary), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def tls_token_daemon(tmp_path: Path, pki: Path, token_file: Path) -> DaemonProc:
    body = (
        f'tls_cert = "{pki / "server.crt"}"\ntls_key = "{pki / "server.key"}"\n'
        f'auth_token_file = "{token_file}"\n'
    )
    config, addr = write_config(tmp_path, body)
    return await start_daemon(config, addr, creds=tls_creds(pki))


async def test_tls_and_token_from_python_cli_and_grpcurl(
    tmp_path: Path, pki: Path, tokens: tuple[Path, Path]
) -> None:
    right, wrong = tokens
    d = await tls_token_daemon(tmp_path, pki, right)
    try:
        async with grpc.aio.insecure_channel(d.addr) as plain:
            assert await list_models(plain, bearer(TOKEN)) == grpc.StatusCode.UNAVAILABLE
        assert await list_models(d.channel) == UNAUTHENTICATED
        assert await list_models(d.channel, bearer(WRONG)) == UNAUTHENTICATED
        assert await list_models(d.channel, bearer(TOKEN)) == grpc.StatusCode.OK

        tls = ("--addr", d.addr, "--tls-ca", str(pki / "ca.crt"))
        ok = await modeld("models", "--json", *tls, "--token-file", str(right))
        assert ok.code == 0, ok.err
        assert [m["name"] for m in json.loads(ok.out)["models"]] == ["echo", "echo-http"]
        from_env = await modeld("models", *tls, env={"MODELD_TOKEN_FILE": str(right)})
        assert from_env.code == 0, from_env.err
        for token_args in ((), ("--token-file", str(wrong))):
            denied = await modeld("models", *tls, *token_args)
            assert denied.code == 1
            assert denied.err.startswith("modeld: UNAUTHENTICATED: ")
            assert denied.err.count("\n") == 1
        plaintext = await modeld("models", "--addr", d.addr, "--token-file", str(right))
        assert plaintext.code == 1
        assert plaintext.err.startswith("modeld: UNAVAILABLE: ")

        if Path(sys.executable).with_name("grpcurl").exists():
            code, out = await grpcurl(
                "-cacert", str(pki / "ca.crt"), "-H", f"authorization: Bearer {TOKEN}",
                d.addr, "modeld.v1.ModelControl/ListModels",
            )  # fmt: skip
            assert code == 0, out
            code, out = await grpcurl("-cacert", str(pki / "ca.crt"), d.addr, "list")
            assert code != 0
            assert "Unauthenticated" in out

        shown = await modeld("config", "show", "--config", str(d.config))
        assert shown.code == 0, shown.err
        assert json.loads(shown.out)["auth_token_file"] == str(right)
        assert TOKEN not in shown.out
        assert await d.stop() == 0
    finally:
        await d.close()
    assert any(e.get("event") == "auth_denied" for e in d.log)
    daemon_output = "\n".join(d.raw)
    assert TOKEN not in daemon_output
    assert WRONG not in daemon_output


async def test_mutual_tls_needs_a_client_certificate(tmp_path: Path, pki: Path) -> None:
    body = (
        f'tls_cert = "{pki / "server.crt"}"\ntls_key = "{pki / "server.key"}"\n'
        f'tls_client_ca = "{pki / "ca.crt"}"\n'
    )
    config, addr = write_config(tmp_path, body)
    d = await start_daemon(config, addr, creds=tls_creds(pki, client_cert=True))
    try:
        assert await list_models(d.channel) == grpc.StatusCode.OK
        async with grpc.aio.secure_channel(addr, tls_creds(pki)) as no_cert:
            assert await list_models(no_cert) == grpc.StatusCode.UNAVAILABLE
        tls = ("--addr", addr, "--tls-ca", str(pki / "ca.crt"))
        client = ("--tls-cert", str(pki / "client.crt"), "--tls-key", str(pki / "client.key"))
        ok = await modeld("models", *tls, *client)
        assert ok.code == 0, ok.err
        refused = await modeld("models", *tls)
        assert refused.code == 1
        assert refused.err.startswith("modeld: UNAVAILABLE: ")
        half = await modeld("models", *tls, "--tls-cert", str(pki / "client.crt"))
        assert half.code == 2
        assert half.err == "modeld: --tls-cert and --tls-key go together\n"
    finally:
        await d.stop()


async def test_open_remote_port_is_refused_with_one_line(tmp_path: Path) -> None:
    config, addr = write_config(tmp_path, "")
    remote = f"0.0.0.0:{free_port()}"
    d = await start_daemon(config, addr, "--listen", remote, wait=False)
    try:
        assert await asyncio.wait_for(d.proc.wait(), 20) == 2
    finally:
        await d.close()
    assert len(d.raw) == 1
    assert d.raw[0].startswith(f"modeld: listen: {remote} can be reached from other hosts")
    assert "allow_insecure_remote = true" in d.raw[0]


async def test_allow_insecure_remote_gets_past_the_check(tmp_path: Path) -> None:
    """Proved without serving anything remote: the start goes on, and stops at the registry."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "modeld.db").write_text("not a database\n")
    config, addr = write_config(tmp_path, "allow_insecure_remote = true\n")
    d = await start_daemon(config, addr, "--listen", f"0.0.0.0:{free_port()}", wait=False)
    try:
        assert await asyncio.wait_for(d.proc.wait(), 20) == 2
    finally:
        await d.close()
    refusals = [line for line in d.raw if line.startswith("modeld: ")]
    assert refusals == [
        f"modeld: {state / 'modeld.db'} is not a SQLite database; refusing to touch it"
    ]
