"""The packages' default topology (issue 35.6), read from the files the packages ship: the gateway tier serves the
clients' port, enabled with the controller, and the controller's built-in gateway is on loopback only."""

from __future__ import annotations

import ipaddress
import re
import tomllib
from pathlib import Path

from slinfer import config as config_mod

PACKAGING = Path(__file__).resolve().parents[2] / "packaging"


def _install_section(unit: str) -> str:
    return unit[unit.index("[Install]"):]


def test_enabling_the_controller_enables_the_gateway_tier() -> None:
    controller = (PACKAGING / "systemd" / "slinfer-controller.service").read_text()
    gateway = (PACKAGING / "systemd" / "slinfer-gateway.service").read_text()
    assert re.findall(r"^Also=(.*)$", _install_section(controller), re.M) == ["slinfer-gateway.service"]
    # Control: the agent's unit names no tier, and the tier's own unit is wanted by the usual target.
    agent = (PACKAGING / "systemd" / "slinfer-agent.service").read_text()
    assert not re.search(r"^Also=", agent, re.M)
    assert re.search(r"^WantedBy=multi-user.target$", _install_section(gateway), re.M)
    assert re.search(r"^After=.*\bslinfer-controller\.service\b", gateway, re.M)


def test_the_packaged_config_puts_the_builtin_gateway_on_loopback_beside_the_tier() -> None:
    path = PACKAGING / "etc" / "slinfer.toml"
    config = config_mod.parse(tomllib.loads(path.read_text()), str(path))
    builtin, public = config.controller.gateway_listen, config.gateway.listen
    host, _, port = builtin.rpartition(":")
    assert ipaddress.ip_address(host).is_loopback, builtin
    assert port != public.rpartition(":")[2], "the tier and the built-in gateway would want the same port"
    # Control: the code's default is the one-process site's (the built-in gateway on [gateway].listen).
    assert config_mod.parse({}).controller.gateway_listen == ""
