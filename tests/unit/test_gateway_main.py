"""`slinfer-controller` as a process: config errors, serving a request end to end, clean SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
import time
from pathlib import Path

import aiohttp
import grpc

from slinfer.controller.main import main
from slinfer.v1 import admin_pb2, admin_pb2_grpc, controller_pb2, controller_pb2_grpc


def test_config_error_names_the_key_and_exits_2(tmp_path: Path, capsys) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[gateway]\nqueue_size = "many"\n')
    assert main(["--config", str(path)]) == 2
    assert "gateway.queue_size" in capsys.readouterr().err


def test_missing_config_file_exits_2(tmp_path: Path, capsys) -> None:
    assert main(["--config", str(tmp_path / "nope.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_controller_process_routes_a_request_and_stops_on_sigterm(tmp_path: Path, standins,
                                                                        engine_pb) -> None:
    engine = await standins(model="m", api_key="ek")
    grpc_port, http_port = _free_port(), _free_port()
    config = tmp_path / "slinfer.toml"
    config.write_text(f"""
[controller]
listen = "127.0.0.1:{grpc_port}"
state_dir = "{tmp_path / 'state'}"
token = "agent-token"
# No Slurm here: every Slurm command fails, so the autoscaler only logs.
slurm_bin_dir = "{tmp_path / 'no-slurm'}"

[gateway]
listen = "127.0.0.1:{http_port}"
api_keys = ["client-key"]

[[models]]
name = "m"
source = "/models/m"
""")
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "slinfer.controller.main", "--config",
                                                str(config), stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{http_port}"
        async with aiohttp.ClientSession() as http:
            for _ in range(200):
                try:
                    async with http.get(f"{url}/healthz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
            else:
                raise AssertionError("the controller did not come up")

            async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                stub = controller_pb2_grpc.RegistryStub(channel)
                report = controller_pb2.AgentReport(node="n1", agent_id="a", token="agent-token",
                                                    engines=[engine_pb("7", "m", engine.base_url, "ek")])
                call = stub.Report(iter([report]))
                ack = await call.read()
                assert ack.heartbeat_interval == 1.0
                async with http.post(f"{url}/v1/chat/completions", headers={"Authorization": "Bearer client-key"},
                                     json={"model": "m", "messages": [{"role": "user", "content": "x"}]}) as resp:
                    assert resp.status == 200
                    assert (await resp.json())["object"] == "chat.completion"
                # The admin API is served next to the Registry: a key created there works at the gateway.
                admin = admin_pb2_grpc.AdminStub(channel)
                auth = (("authorization", "Bearer agent-token"),)
                status = await admin.Status(admin_pb2.StatusRequest(), metadata=auth)
                assert [m.name for m in status.models] == ["m"]
                created = await admin.CreateKey(admin_pb2.CreateKeyRequest(name="carol"), metadata=auth)
                async with http.post(f"{url}/v1/completions", headers={"Authorization": f"Bearer {created.secret}"},
                                     json={"model": "m", "prompt": "x"}) as resp:
                    assert resp.status == 200
                bad = stub.Report(iter([controller_pb2.AgentReport(node="n2", token="wrong")]))
                try:
                    await bad.read()
                    raise AssertionError("a wrong agent token was accepted")
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
        assert engine.seen.auth == ["Bearer ek", "Bearer ek"]
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
        assert time.monotonic() - started < 10
        output = (await proc.stdout.read()).decode() if proc.stdout else ""
        assert "controller up" in output and "controller stopped" in output
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_startup_problems_exit_1_with_the_reason(tmp_path: Path, capsys) -> None:
    def config(extra: str) -> str:
        path = tmp_path / "c.toml"
        path.write_text(f'[controller]\nlisten = "127.0.0.1:{_free_port()}"\nstate_dir = "{tmp_path}/s"\n'
                        f'slurm_bin_dir = "{tmp_path}/none"\ntoken = "startup-token"\n'
                        f'[gateway]\nlisten = "127.0.0.1:{_free_port()}"\n'
                        + extra)
        return str(path)

    assert main(["--config", config(f'[kubernetes]\nenabled = true\nkubeconfig = "{tmp_path}/nope"\n')]) == 1
    assert "kubernetes: cannot load credentials" in capsys.readouterr().err
    # Leader election is supported; without credentials it fails like the rest of the Kubernetes part.
    assert main(["--config", config("[kubernetes]\nenabled = true\nleader_election = true\n")]) == 1
    assert "kubernetes: cannot load credentials" in capsys.readouterr().err
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "keys.json").write_text("garbage")
    assert main(["--config", config("")]) == 1
    assert "keys.json" in capsys.readouterr().err
    (tmp_path / "s" / "keys.json").unlink()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        path = tmp_path / "busy.toml"
        path.write_text(f'[controller]\nlisten = "127.0.0.1:{_free_port()}"\nstate_dir = "{tmp_path}/s"\n'
                        f'slurm_bin_dir = "{tmp_path}/none"\ntoken = "startup-token"\n'
                        f'[gateway]\nlisten = "127.0.0.1:{port}"\n')
        assert main(["--config", str(path)]) == 1
    assert "gateway.listen: cannot listen" in capsys.readouterr().err
