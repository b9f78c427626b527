"""The config loader: a broken config names the key at fault, whatever is broken (property-based)."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slinfer import config

SECTIONS = {
    "controller": config.ControllerConfig,
    "gateway": config.GatewayConfig,
    "agent": config.AgentConfig,
    "kubernetes": config.KubernetesConfig,
}
VALID: dict[str, Any] = {"models": [{"name": "tiny", "source": "/models/tiny", "max_replicas": 2}]}


def _fields(cls: type) -> list[tuple[str, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(cls)]


def _wrong_value(hint: Any) -> Any:
    """A value of the wrong type for the field."""
    if hint is str:
        return 12
    if hint in (int, float):
        return "many"
    if hint is bool:
        return "yes"
    return 3.5  # lists and tables


SECTION_KEYS = [(section, name, hint) for section, cls in SECTIONS.items() for name, hint in _fields(cls)]
MODEL_KEYS = _fields(config.ModelConfig)


def test_the_valid_config_parses() -> None:
    parsed = config.parse(VALID)
    assert parsed.model("tiny") is not None and parsed.model("tiny").max_replicas == 2  # type: ignore[union-attr]


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(SECTION_KEYS))
def test_a_mistyped_section_key_is_named(case: tuple[str, str, Any]) -> None:
    section, name, hint = case
    data = {**VALID, section: {name: _wrong_value(hint)}}
    with pytest.raises(config.ConfigError) as err:
        config.parse(data)
    assert err.value.key.startswith(f"{section}.{name}")
    assert str(err.value).startswith(f"{section}.{name}")


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(MODEL_KEYS), st.integers(min_value=0, max_value=3))
def test_a_mistyped_model_key_is_named_with_its_index(case: tuple[str, Any], index: int) -> None:
    name, hint = case
    models = [{"name": f"m{i}", "source": "/m"} for i in range(index + 1)]
    models[index][name] = _wrong_value(hint)
    with pytest.raises(config.ConfigError) as err:
        config.parse({"models": models})
    assert err.value.key.startswith(f"models[{index}].{name}")


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([*SECTIONS, "models"]),
       st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=20))
def test_an_unknown_key_is_named(section: str, key: str) -> None:
    known = {f.name for f in dataclasses.fields(SECTIONS.get(section, config.ModelConfig))}
    if key in known:
        return
    if section == "models":
        data: dict[str, Any] = {"models": [{"name": "tiny", "source": "/m", key: 1}]}
        expected = f"models[0].{key}"
    else:
        data = {section: {key: 1}}
        expected = f"{section}.{key}"
    with pytest.raises(config.ConfigError) as err:
        config.parse(data)
    assert err.value.key == expected
    assert "unknown key" in str(err.value)


@pytest.mark.parametrize("model, key", [
    ({"source": "/m"}, "models[0].name"),
    ({"name": "tiny"}, "models[0].source"),
    ({"name": "a;b", "source": "/m"}, "models[0].name"),
    ({"name": "t", "source": "/m", "min_replicas": 3, "max_replicas": 1}, "models[0].max_replicas"),
    ({"name": "t", "source": "/m", "time_limit": "forever"}, "models[0].time_limit"),
    ({"name": "t", "source": "/m", "target_outstanding": 0}, "models[0].target_outstanding"),
    ({"name": "t", "source": "/m", "balancer": "random"}, "models[0].balancer"),
])
def test_a_bad_model_value_is_named(model: dict[str, Any], key: str) -> None:
    with pytest.raises(config.ConfigError) as err:
        config.parse({"models": [model]})
    assert err.value.key == key


@pytest.mark.parametrize("data, key", [
    ({"nonsense": {}}, "nonsense"),
    ({"gateway": {"listen": "8000"}}, "gateway.listen"),
    ({"agent": {"port_range": [80, 90]}}, "agent.port_range"),
    ({"models": [{"name": "a", "source": "/m"}, {"name": "a", "source": "/n"}]}, "models[1].name"),
])
def test_other_bad_values_are_named(data: dict[str, Any], key: str) -> None:
    with pytest.raises(config.ConfigError) as err:
        config.parse(data)
    assert err.value.key == key


def test_a_file_that_is_not_toml_says_so(tmp_path: Path) -> None:
    path = tmp_path / "slinfer.toml"
    path.write_text("[agent\nsocket = 1\n")
    with pytest.raises(config.ConfigError, match="not valid TOML"):
        config.load(path)


def test_a_missing_named_file_is_an_error_but_the_absent_default_is_not(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.toml")
    if not config.DEFAULT_PATH.exists():
        assert config.load(None).models == []
