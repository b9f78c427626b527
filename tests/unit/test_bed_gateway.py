"""The bed's gateway (issue 35.6): the tier serves the clients' port by default, the controller's built-in gateway
a port of its own; SLINFER_BED_GATEWAY=builtin serves the clients' port from the built-in gateway, with no tier."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from slinfer import config as config_mod
from slinfer.dev import devcluster
from slinfer.tls import Issued

CERT = Issued(Path("/s/c.pem"), Path("/s/c.key"))


def _config(bed: devcluster.Bed) -> config_mod.Config:
    text = devcluster._slinfer_toml(bed, bed.node_names[0], "T", Path("/s/ca.pem"), CERT, CERT)
    return config_mod.parse(tomllib.loads(text))


def test_the_tier_is_the_default_and_the_builtin_gateway_moves(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(devcluster.GATEWAY_ENV, raising=False)
    bed = devcluster.Bed(Path("/state"), 16800)
    assert bed.gateway == "tier"
    config = _config(bed)
    assert config.gateway.listen == f"127.0.0.1:{bed.gateway_port}"
    assert config.controller.gateway_listen == f"127.0.0.1:{bed.builtin_gateway_port}"
    assert bed.builtin_gateway_port != bed.gateway_port
    assert bed.gateway_url == f"http://127.0.0.1:{bed.gateway_port}/v1"


def test_builtin_serves_the_clients_port_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(devcluster.GATEWAY_ENV, "builtin")
    bed = devcluster.Bed(Path("/state"), 16800)
    config = _config(bed)
    assert config.controller.gateway_listen == ""
    assert bed.builtin_gateway_port == bed.gateway_port
    assert config.gateway.listen == f"127.0.0.1:{bed.gateway_port}"


def test_an_unknown_mode_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(devcluster.GATEWAY_ENV, "both")
    with pytest.raises(ValueError, match="SLINFER_BED_GATEWAY='both'"):
        devcluster.Bed(Path("/state"), 16800)
