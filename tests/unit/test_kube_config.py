"""The [kubernetes] section: defaults that match the issue, and bad values named by their key."""

from __future__ import annotations

import pytest

from slinfer.config import ConfigError, parse


def test_defaults_follow_the_issue() -> None:
    kube = parse({}).kubernetes
    assert (kube.enabled, kube.lease_duration_s, kube.renew_interval_s) == (False, 40, 10.0)
    assert kube.leader_election is False
    assert kube.gateway_address == "" and kube.request_timeout_s > 0


@pytest.mark.parametrize(("section", "key"), [
    ({"renew_interval_s": 40}, "kubernetes.renew_interval_s"),
    ({"renew_interval_s": 0}, "kubernetes.renew_interval_s"),
    ({"lease_duration_s": 5}, "kubernetes.renew_interval_s"),
    ({"request_timeout_s": 0}, "kubernetes.request_timeout_s"),
    ({"gc_grace_s": -1}, "kubernetes.gc_grace_s"),
    ({"gateway_address": 10}, "kubernetes.gateway_address"),
    ({"gateway_address": "127.0.0.1"}, "kubernetes.gateway_address"),
    ({"gateway_address": "::1"}, "kubernetes.gateway_address"),
    ({"gateway_address": "169.254.1.1"}, "kubernetes.gateway_address"),
    ({"gateway_address": "0.0.0.0"}, "kubernetes.gateway_address"),
    ({"namespce": "x"}, "kubernetes.namespce"),
])
def test_bad_values_name_their_key(section: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse({"kubernetes": section})
    assert err.value.key == key


@pytest.mark.parametrize("address", ["10.0.0.1", "fd00::1", "head.example.org", ""])
def test_a_routable_gateway_address_or_a_name_is_accepted(address: str) -> None:
    assert parse({"kubernetes": {"gateway_address": address}}).kubernetes.gateway_address == address


def test_a_loopback_gateway_address_says_why() -> None:
    with pytest.raises(ConfigError, match="loopback"):
        parse({"kubernetes": {"gateway_address": "127.0.0.1"}})
