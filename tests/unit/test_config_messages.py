"""The words of config errors, now that msgspec checks the types (issue 28): every kind of error msgspec
reports comes back naming the dotted key (a table's entry and a list's index included), what the key must be
and the value given, as the hand-written checker worded them; and the dataclasses' API is unchanged."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from slinfer import config

MODEL = {"name": "a", "source": "/m"}


@pytest.mark.parametrize("data, message", [
    ({"controller": 1}, "controller: must be a table"),
    ({"models": [1]}, "models[0]: must be a table"),
    ({"controller": {"heartbeat_s": "x"}}, "controller.heartbeat_s: must be a number, not 'x'"),
    ({"controller": {"heartbeat_s": True}}, "controller.heartbeat_s: must be a number, not True"),
    ({"gateway": {"retries": 1.5}}, "gateway.retries: must be an integer, not 1.5"),
    ({"gateway": {"retries": False}}, "gateway.retries: must be an integer, not False"),
    ({"agent": {"warm_start": 1}}, "agent.warm_start: must be true or false, not 1"),
    ({"agent": {"address": 7}}, "agent.address: must be a string, not 7"),
    ({"agent": {"pool_users": "x"}}, "agent.pool_users: must be a list, not str"),
    ({"agent": {"pool_users": ["a", 3]}}, "agent.pool_users[1]: must be a string, not 3"),
    ({"agent": {"engine_env": []}}, "agent.engine_env: must be a table, not list"),
    ({"agent": {"engine_env": {"A": "1", "B": 2}}}, "agent.engine_env.B: must be a string, not 2"),
    ({"models": [MODEL, {**MODEL, "name": "b", "gpus": "2"}]}, "models[1].gpus: must be an integer, not '2'"),
    ({"models": [{**MODEL, "engine_env": {"X": 1.5}}]}, "models[0].engine_env.X: must be a string, not 1.5"),
    ({"models": [{"name": "a"}]}, "models[0].source: missing required key"),
    ({"models": [{**MODEL, "zz": 1}]}, "models[0].zz: unknown key (known: account, adapters, balancer, "),
    ({"kubernetes": {"zz": 1}}, "kubernetes.zz: unknown key (known: enabled, gateway_address, "),
])
def test_each_kind_of_error_is_worded_with_its_key(data: dict[str, Any], message: str) -> None:
    with pytest.raises(config.ConfigError) as err:
        config.parse(data)
    assert str(err.value).startswith(message)
    assert err.value.key == message.split(":")[0]


def test_the_known_keys_are_all_listed() -> None:
    with pytest.raises(config.ConfigError) as err:
        config.parse({"gateway": {"zz": 1}})
    known = sorted(f.name for f in dataclasses.fields(config.GatewayConfig))
    assert str(err.value) == f"gateway.zz: unknown key (known: {', '.join(known)})"


def test_values_keep_the_dataclasses_types_and_defaults() -> None:
    """Positive control: a valid config builds the same frozen dataclasses, an integer where a number goes
    becomes a float, and absent keys take the dataclass's defaults (a fresh list each time)."""
    parsed = config.parse({"gateway": {"queue_timeout_s": 3}, "models": [MODEL, {**MODEL, "name": "b"}]})
    assert isinstance(parsed.gateway, config.GatewayConfig)
    assert parsed.gateway.queue_timeout_s == 3.0 and isinstance(parsed.gateway.queue_timeout_s, float)
    assert parsed.gateway.retries == config.GatewayConfig().retries
    assert parsed.agent == config.AgentConfig()
    assert parsed.models[0].engine_args == [] and parsed.models[0].engine_args is not parsed.models[1].engine_args
    assert dataclasses.replace(parsed.gateway, retries=5).retries == 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        parsed.gateway.retries = 1  # type: ignore[misc]
