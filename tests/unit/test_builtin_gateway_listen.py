"""[controller].gateway_listen: the controller's built-in gateway on a port of its own, so that slinfer-gateway
can serve [gateway].listen on the same host (the packages' default topology)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import aiohttp
import pytest

from slinfer import config as config_mod
from slinfer.controller import main as controller_main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


async def _served_on(tmp_path: Path, gateway_listen: str, public: int) -> tuple[int, bool]:
    """The built-in gateway's port as the controller says, and whether [gateway].listen's port was taken."""
    grpc_port = _free_port()
    controller = {"listen": f"127.0.0.1:{grpc_port}", "address": f"127.0.0.1:{grpc_port}", "token": "t",
                  "state_dir": str(tmp_path / "state"), "slurm_bin_dir": str(tmp_path / "no-slurm")}
    if gateway_listen:
        controller["gateway_listen"] = gateway_listen
    config = config_mod.parse({"controller": controller, "gateway": {"listen": f"127.0.0.1:{public}"}})
    stop, ready = asyncio.Event(), asyncio.Event()
    ports: list[int] = []

    def on_ready(_grpc: int, gateway: int) -> None:
        ports.append(gateway)
        ready.set()

    task = asyncio.create_task(controller_main.serve(config, stop, on_ready))
    await asyncio.wait([task, asyncio.create_task(ready.wait())], return_when=asyncio.FIRST_COMPLETED, timeout=30)
    if task.done():
        task.result()
    try:
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{ports[0]}/healthz") as resp:
            assert resp.status == 200
        return ports[0], _listening(public)
    finally:
        stop.set()
        await task


async def test_the_builtin_gateway_moves_off_the_public_port(tmp_path: Path) -> None:
    own, public = _free_port(), _free_port()
    assert await _served_on(tmp_path / "a", f"127.0.0.1:{own}", public) == (own, False)
    # Control: without the key the built-in gateway is on [gateway].listen, as before.
    assert await _served_on(tmp_path / "b", "", public) == (public, True)


def test_a_bad_gateway_listen_names_its_key() -> None:
    with pytest.raises(config_mod.ConfigError) as caught:
        config_mod.parse({"controller": {"gateway_listen": "8001"}})
    assert caught.value.key == "controller.gateway_listen"
    assert config_mod.parse({"controller": {"gateway_listen": "127.0.0.1:8001"}}).controller.gateway_listen
