"""Secure by default: an empty token refuses to start (controller and agent) unless `insecure = true`, which is
logged; the gRPC port speaks TLS (optionally mutual) from the config's PEM files, refuses plaintext clients and
clients that do not trust its CA; the CLI and the agent's reporter verify it; engines serve HTTPS with the
node's certificate and the gateway verifies them. Real gRPC servers and clients on
loopback, real certificates made with `cryptography`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import ssl
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest

from slinfer import config as config_mod
from slinfer import tls
from slinfer.agent import daemon as agent_daemon
from slinfer.agent.gpu import Gpus
from slinfer.agent.reporter import Reporter
from slinfer.cli import main as cli
from slinfer.controller import main as controller_main
from slinfer.v1 import controller_pb2, controller_pb2_grpc
from tests.unit.conftest import standin_engine

TOKEN = "security-test-token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pki")
    ca = tls.CertificateAuthority(folder / "ca", "test CA")
    other = tls.CertificateAuthority(folder / "other", "another CA")
    server = ca.issue("controller", ["127.0.0.1", "localhost"])
    client = ca.issue("agent", ["node1"], client=True)
    stranger = other.issue("stranger", ["node9"], client=True)
    return {"ca": ca.cert_path, "other_ca": other.cert_path, "cert": server.cert, "key": server.key,
            "client_cert": client.cert, "client_key": client.key, "stranger_cert": stranger.cert,
            "stranger_key": stranger.key}


def _config_text(tmp_path: Path, grpc_port: int, *, token: str = TOKEN, tls_lines: str = "",
                 agent_lines: str = "", extra: str = "") -> str:
    return f"""
[controller]
listen = "127.0.0.1:{grpc_port}"
address = "127.0.0.1:{grpc_port}"
state_dir = "{tmp_path / 'state'}"
token = "{token}"
slurm_bin_dir = "{tmp_path / 'no-slurm'}"
{tls_lines}
{extra}
[gateway]
listen = "127.0.0.1:{_free_port()}"

[agent]
controller = "127.0.0.1:{grpc_port}"
{agent_lines}
"""


def _tls_lines(pki: dict[str, Path], mutual: bool = False) -> str:
    return (f'tls_cert = "{pki["cert"]}"\ntls_key = "{pki["key"]}"\ntls_ca = "{pki["ca"]}"\n'
            f"tls_client_auth = {'true' if mutual else 'false'}\n")


def _agent_lines(pki: dict[str, Path], stem: str = "client") -> str:
    return f'tls_cert = "{pki[stem + "_cert"]}"\ntls_key = "{pki[stem + "_key"]}"\n'


@contextlib.asynccontextmanager
async def running(text: str, tmp_path: Path) -> AsyncIterator[tuple[config_mod.Config, Path]]:
    """A real controller (registry, admin, gateway) serving `text`'s config in this event loop."""
    path = tmp_path / "slinfer.toml"
    path.write_text(text)
    config = config_mod.load(path)
    stop = asyncio.Event()
    ready = asyncio.Event()
    task = asyncio.create_task(controller_main.serve(config, stop, lambda *_: ready.set()))
    await asyncio.wait([task, asyncio.create_task(ready.wait())], return_when=asyncio.FIRST_COMPLETED, timeout=30)
    if task.done():
        task.result()
    try:
        yield config, path
    finally:
        stop.set()
        await task


async def _report(channel: grpc.aio.Channel, token: str = TOKEN) -> controller_pb2.ReportAck:
    call = controller_pb2_grpc.RegistryStub(channel).Report(
        iter([controller_pb2.AgentReport(node="node1", agent_id="a1", token=token, sent_at=1.0)]))
    try:
        return await asyncio.wait_for(call.read(), 10)
    finally:
        call.cancel()


# ---- the token ------------------------------------------------------------------------------------------------
def test_an_empty_token_is_refused_with_the_key_and_how_to_set_it() -> None:
    with pytest.raises(config_mod.ConfigError) as caught:
        config_mod.require_token(config_mod.parse({}))
    assert caught.value.key == "controller.token"
    message = str(caught.value)
    assert "controller.token" in message and "secrets.token_urlsafe" in message and "insecure = true" in message
    config_mod.require_token(config_mod.parse({"controller": {"token": "t"}}))
    config_mod.require_token(config_mod.parse({"controller": {"insecure": True}}))


def test_the_controller_process_refuses_an_empty_token(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "slinfer.toml"
    path.write_text(_config_text(tmp_path, _free_port(), token=""))
    assert controller_main.main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "controller.token: is empty" in err and "insecure = true" in err


async def test_serve_itself_refuses_an_empty_token(tmp_path: Path) -> None:
    config = config_mod.parse({"controller": {"state_dir": str(tmp_path)}})
    with pytest.raises(controller_main.StartupError, match=r"controller\.token"):
        await controller_main.serve(config, asyncio.Event())


async def test_insecure_starts_without_a_token_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    port = _free_port()
    with caplog.at_level(logging.WARNING, logger="slinfer.controller"):
        async with running(_config_text(tmp_path, port, token="", extra="insecure = true"), tmp_path):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                ack = await _report(channel, token="")
                assert ack.heartbeat_interval > 0  # it does run, unauthenticated
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("INSECURE: [controller].insecure = true and no [controller].token" in w for w in warnings), warnings
    assert any("is plaintext" in w for w in warnings), warnings


def test_an_agent_that_reports_refuses_an_empty_token(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "slinfer.toml"
    path.write_text(_config_text(tmp_path, _free_port(), token=""))
    assert agent_daemon.main(["--config", str(path)]) == 2
    assert "controller.token: is empty" in capsys.readouterr().err


def test_half_a_tls_setup_is_a_config_error() -> None:
    with pytest.raises(config_mod.ConfigError) as caught:
        config_mod.parse({"controller": {"tls_cert": "/x.pem"}})
    assert caught.value.key == "controller.tls_key"
    with pytest.raises(config_mod.ConfigError) as caught:
        config_mod.parse({"agent": {"engine_tls_key": "/x.key"}})
    assert caught.value.key == "agent.engine_tls_cert"
    with pytest.raises(config_mod.ConfigError) as caught:
        config_mod.parse({"controller": {"tls_client_auth": True}})
    assert caught.value.key == "controller.tls_client_auth"


async def test_an_unreadable_certificate_fails_the_start_with_its_key(tmp_path: Path) -> None:
    text = _config_text(tmp_path, _free_port(), tls_lines=f'tls_cert = "{tmp_path}/no.pem"\n'
                                                          f'tls_key = "{tmp_path}/no.key"')
    path = tmp_path / "slinfer.toml"
    path.write_text(text)
    with pytest.raises(controller_main.StartupError, match=r"controller\.tls_cert: cannot read"):
        await controller_main.serve(config_mod.load(path), asyncio.Event())


# ---- TLS on the gRPC port -------------------------------------------------------------------------------------
async def test_tls_port_serves_a_verified_client_and_refuses_plaintext_and_strangers(
        tmp_path: Path, pki: dict[str, Path]) -> None:
    port = _free_port()
    async with running(_config_text(tmp_path, port, tls_lines=_tls_lines(pki)), tmp_path) as (config, _):
        address = f"127.0.0.1:{port}"
        async with tls.aio_channel(address, config) as channel:
            assert (await _report(channel)).heartbeat_interval > 0
            with pytest.raises(grpc.aio.AioRpcError) as wrong:
                await _report(channel, token="wrong")
            assert wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # A plaintext client gets no answer from the TLS port.
        async with grpc.aio.insecure_channel(address) as plain:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await _report(plain)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        # A client that trusts another CA refuses the controller's certificate.
        stranger = grpc.ssl_channel_credentials(root_certificates=pki["other_ca"].read_bytes())
        async with grpc.aio.secure_channel(address, stranger) as untrusting:
            with pytest.raises(grpc.aio.AioRpcError) as untrusted:
                await _report(untrusting)
            assert untrusted.value.code() == grpc.StatusCode.UNAVAILABLE
        # The name is checked too: the certificate is for 127.0.0.1 and localhost, not for another name.
        creds = grpc.ssl_channel_credentials(root_certificates=pki["ca"].read_bytes())
        async with grpc.aio.secure_channel(address, creds,
                                           options=[("grpc.ssl_target_name_override", "head01")]) as misnamed:
            with pytest.raises(grpc.aio.AioRpcError) as wrong_name:
                await _report(misnamed)
            assert wrong_name.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_refuses_an_agent_without_a_certificate_of_the_ca(tmp_path: Path,
                                                                           pki: dict[str, Path]) -> None:
    port = _free_port()
    text = _config_text(tmp_path, port, tls_lines=_tls_lines(pki, mutual=True), agent_lines=_agent_lines(pki))
    async with running(text, tmp_path) as (config, _):
        address = f"127.0.0.1:{port}"
        async with tls.aio_channel(address, config) as channel:
            assert (await _report(channel)).heartbeat_interval > 0
        ca = pki["ca"].read_bytes()
        for creds in (grpc.ssl_channel_credentials(root_certificates=ca),
                      grpc.ssl_channel_credentials(root_certificates=ca, private_key=pki["stranger_key"].read_bytes(),
                                                   certificate_chain=pki["stranger_cert"].read_bytes())):
            async with grpc.aio.secure_channel(address, creds) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await _report(channel)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_the_agents_reporter_registers_over_mutual_tls(tmp_path: Path, pki: dict[str, Path]) -> None:
    port = _free_port()
    text = _config_text(tmp_path, port, tls_lines=_tls_lines(pki, mutual=True), agent_lines=_agent_lines(pki))
    async with running(text, tmp_path) as (config, _):
        reporter = Reporter(config.agent.controller, "node1", "127.0.0.1", list, Gpus(), 0.2, TOKEN, config)
        task = asyncio.create_task(reporter.run())
        try:
            for _ in range(100):
                if reporter.connected:
                    break
                await asyncio.sleep(0.1)
            assert reporter.connected
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_the_cli_speaks_tls_and_a_cli_without_the_ca_cannot(tmp_path: Path, pki: dict[str, Path],
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    port = _free_port()
    async with running(_config_text(tmp_path, port, tls_lines=_tls_lines(pki)), tmp_path) as (_, path):
        # The CLI is synchronous gRPC: run it off the loop that serves.
        code = await asyncio.to_thread(cli.main, ["status", "--config", str(path), "--json"])
        out = capsys.readouterr()
        assert code == 0, out.err
        assert '"squeueOk"' in out.out
        plain = tmp_path / "plain.toml"
        plain.write_text(_config_text(tmp_path, port))
        code = await asyncio.to_thread(cli.main, ["status", "--config", str(plain)])
        assert code != 0
        assert f"cannot reach the controller at 127.0.0.1:{port} in plaintext" in capsys.readouterr().err
        distrust = tmp_path / "distrust.toml"
        distrust.write_text(_config_text(tmp_path, port, tls_lines=f'tls_ca = "{pki["other_ca"]}"'))
        code = await asyncio.to_thread(cli.main, ["status", "--config", str(distrust)])
        assert code != 0
        err = capsys.readouterr().err
        assert f"cannot reach the controller at 127.0.0.1:{port} over TLS, trusting {pki['other_ca']}" in err


# ---- the gateway-to-engine hop --------------------------------------------------------------------------------
def _server_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


async def test_the_gateway_verifies_https_engines_against_the_engine_ca(tmp_path: Path, pki: dict[str, Path],
                                                                        engine_pb) -> None:
    """An engine with a certificate of the engine CA is served; one whose certificate another CA signed is
    never sent the request (the handshake fails first), so its API key and the prompt stay unsent."""
    good = standin_engine.StandinEngine(model="m", api_key="ek")
    await good.start(ssl_context=_server_context(pki["cert"], pki["key"]))
    stranger_ca = tls.CertificateAuthority(tmp_path / "stranger-ca")
    bad_cert = stranger_ca.issue("engine", ["127.0.0.1"])
    bad = standin_engine.StandinEngine(model="b", api_key="ek")
    await bad.start(ssl_context=_server_context(bad_cert.cert, bad_cert.key))
    port = _free_port()
    text = _config_text(tmp_path, port)
    text = text.replace("[gateway]\n", f'[gateway]\nengine_ca = "{pki["ca"]}"\napi_keys = ["client-key"]\n')
    text = text.replace("[agent]", '[[models]]\nname = "m"\nsource = "/m"\n\n[[models]]\nname = "b"\n'
                                   'source = "/b"\n\n[agent]')
    try:
        async with running(text, tmp_path) as (config, _):
            assert good.base_url.startswith("https://")
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = controller_pb2_grpc.RegistryStub(channel).Report(iter([controller_pb2.AgentReport(
                    node="n1", agent_id="a", token=TOKEN, sent_at=1.0,
                    engines=[engine_pb("7", "m", good.base_url, "ek"), engine_pb("8", "b", bad.base_url, "ek")])]))
                await call.read()
                gateway = f"http://{config.gateway.listen}"
                async with aiohttp.ClientSession(headers={"Authorization": "Bearer client-key"}) as http:
                    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 4}
                    async with http.post(f"{gateway}/v1/chat/completions", json={**body, "model": "m"}) as resp:
                        assert resp.status == 200, await resp.text()
                        assert (await resp.json())["object"] == "chat.completion"
                    async with http.post(f"{gateway}/v1/chat/completions", json={**body, "model": "b"}) as resp:
                        assert resp.status in (502, 503), await resp.text()
                call.cancel()
        assert good.seen.auth == ["Bearer ek"]
        assert bad.seen.requests == 0 and bad.seen.auth == []
    finally:
        await good.stop()
        await bad.stop()


async def test_the_agent_starts_an_https_engine_with_a_private_copy_of_the_node_key(
        tmp_path: Path, pki: dict[str, Path]) -> None:
    """The agent hands vLLM's --ssl-certfile/--ssl-keyfile to the engine (here the stand-in, which takes the same
    flags), as copies only the job's user can read; its health probe verifies the engine against the engine CA,
    the engine turns READY at an https URL, and stopping it removes the copies."""
    from slinfer.agent.engines import EngineManager
    from slinfer.agent.records import RecordStore
    from slinfer.v1 import engine_pb2

    standin = Path(__file__).resolve().parents[2] / "bench" / "standin_engine.py"
    # The engine runs as nobody: its run folder must be reachable as on a node (pytest's tmp_path is root-only).
    run_dir = Path(tempfile.mkdtemp(prefix="h11-engine-tls-"))
    run_dir.chmod(0o711)
    config = config_mod.parse({
        "agent": {"address": "127.0.0.1", "run_dir": str(run_dir), "python": sys.executable,
                  "engine_command": ["{python}", str(standin), "--host", "{host}", "--port", "{port}",
                                     "--model", "{model}"],
                  "engine_tls_cert": str(pki["cert"]), "engine_tls_key": str(pki["key"]),
                  "health_interval_s": 0.2, "verify_jobs": False},
        "gateway": {"engine_ca": str(pki["ca"])},
        "models": [{"name": "m", "source": "/m", "gpus": 0}]})
    connector = aiohttp.TCPConnector(ssl=tls.engine_client_context(config))
    async with aiohttp.ClientSession(connector=connector) as http:
        manager = EngineManager(config, RecordStore(run_dir / "engines"), http, Gpus())
        job = engine_pb2.JobSpec(job_id="41", model="m", uid=65534, gid=65534, user="nobody")
        try:
            engine = await manager.start(job)
            assert engine.base_url.startswith("https://127.0.0.1:")
            copies = [run_dir / "engine-tls" / "41.pem", run_dir / "engine-tls" / "41.key"]
            for copy in copies:
                st = copy.stat()
                assert (st.st_uid, st.st_mode & 0o777) == (65534, 0o400)
            assert copies[1].read_bytes() == pki["key"].read_bytes()
            for _ in range(200):
                states = {e.job_id: e.state for e in manager.engines()}
                if states.get("41") == engine_pb2.READY:
                    break
                await asyncio.sleep(0.1)
            assert states.get("41") == engine_pb2.READY, manager.engines()
        finally:
            await manager.stop("41")
            await manager.close()
        assert not any((run_dir / "engine-tls").iterdir())
    shutil.rmtree(run_dir, ignore_errors=True)
