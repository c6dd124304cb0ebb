"""examples/node/client.js against the real daemon: Route, Predict on the backend, Release.

Needs `node`; installs the example's locked dependencies with `npm ci` when they
are missing (a fresh clone), and skips when that cannot reach the npm registry.
"""

import shutil
from pathlib import Path

import grpc
import pytest

import cli_proc
from daemon_proc import ECHO_CATALOG, running_daemon, start_daemon, write_config
from modeld._proto.modeld.v1 import modeld_pb2 as pb
from pki import have_openssl, make_pki

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "node"
NEEDED = ("@grpc/grpc-js", "@grpc/proto-loader")
NETWORK_ERRORS = ("ENOTFOUND", "EAI_AGAIN", "ECONNREFUSED", "ECONNRESET", "ETIMEDOUT",
                  "ENETUNREACH", "EHOSTUNREACH", "network")  # fmt: skip
TOKEN = "node-client-token-0123456789abcdef"


def installed() -> bool:
    return all((EXAMPLE / "node_modules" / name / "package.json").exists() for name in NEEDED)


async def run(*argv: str, cwd: Path, limit_s: float) -> tuple[int, str, str]:
    result = await cli_proc.run(*argv, cwd=cwd, limit_s=limit_s)
    return result.code, result.out, result.err


@pytest.fixture(scope="module")
def node() -> str:
    binary = shutil.which("node")
    if binary is None:
        pytest.skip("node is not installed")
    return binary


async def ensure_installed() -> None:
    if installed():
        return
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("examples/node/node_modules is missing and npm is not installed")
    code, out, err = await run(
        npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts", cwd=EXAMPLE, limit_s=180
    )
    if code != 0 and any(word in out + err for word in NETWORK_ERRORS):
        pytest.skip(f"npm ci could not reach the registry: {err.strip().splitlines()[-1:]}")
    assert code == 0, f"npm ci failed:\n{out}\n{err}"
    assert installed()


async def test_route_predict_release(tmp_path: Path, node: str) -> None:
    await ensure_installed()
    async with running_daemon(tmp_path, ECHO_CATALOG) as d:
        argv = (node, "client.js", "echo", "--prompt", "hello from node", "--addr", d.addr)
        code, out, err = await run(*argv, cwd=EXAMPLE, limit_s=60)
        assert code == 0, err
        assert out == "hello from node\n"
        assert "(cold start)" in err
        replicas = (await d.stub.ListReplicas(pb.ListReplicasRequest(model="echo"))).replicas
        assert [(r.state, r.in_flight) for r in replicas] == [(pb.READY, 0)]
        assert f"on replica {replicas[0].id} at {replicas[0].address}" in err

        code, out, err = await run(node, "client.js", "nope", "--addr", d.addr, cwd=EXAMPLE,
                                   limit_s=60)  # fmt: skip
        assert code == 1
        assert err.startswith("client.js: NOT_FOUND: model 'nope'")


async def test_tls_mutual_tls_and_token(tmp_path: Path, node: str) -> None:
    if not have_openssl():
        pytest.skip("the openssl command is not installed; it makes the test certificates")
    await ensure_installed()
    pki = make_pki(tmp_path)
    token = tmp_path / "token"
    token.write_text(f"# node\n{TOKEN}\n")
    body = (
        f'tls_cert = "{pki / "server.crt"}"\ntls_key = "{pki / "server.key"}"\n'
        f'tls_client_ca = "{pki / "ca.crt"}"\nauth_token_file = "{token}"\n' + ECHO_CATALOG
    )
    config, addr = write_config(tmp_path, body)
    creds = grpc.ssl_channel_credentials(
        (pki / "ca.crt").read_bytes(),
        (pki / "client.key").read_bytes(),
        (pki / "client.crt").read_bytes(),
    )
    d = await start_daemon(config, addr, creds=creds)
    try:
        tls = ("--addr", addr, "--ca", str(pki / "ca.crt"))
        mtls = (*tls, "--cert", str(pki / "client.crt"), "--key", str(pki / "client.key"))
        code, out, err = await run(node, "client.js", *mtls, "--token-file", str(token),
                                   cwd=EXAMPLE, limit_s=60)  # fmt: skip
        assert (code, out) == (0, "hello from node\n"), err
        code, _, err = await run(node, "client.js", *mtls, cwd=EXAMPLE, limit_s=60)
        assert code == 1
        # The last line: Node may warn first about TLS server names that are IP addresses.
        assert err.splitlines()[-1].startswith("client.js: UNAUTHENTICATED: ")
        code, _, err = await run(node, "client.js", *tls, "--token-file", str(token),
                                 cwd=EXAMPLE, limit_s=60)  # fmt: skip
        assert code == 1
        assert err.splitlines()[-1].startswith("client.js: UNAVAILABLE: ")
    finally:
        await d.stop()
