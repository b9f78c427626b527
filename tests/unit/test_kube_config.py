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
    ({"namespce": "x"}, "kubernetes.namespce"),
])
def test_bad_values_name_their_key(section: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse({"kubernetes": section})
    assert err.value.key == key
