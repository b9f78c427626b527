"""The names and addresses of a bed's network derive from its port base: two beds never share one, and every
interface name fits Linux's 15 characters."""

from __future__ import annotations

import pytest

from slinfer.dev.netns import BedNetwork


def _names(net: BedNetwork) -> set[str]:
    return {net.bridge, *(f(i) for i in net.indexes for f in (net.namespace, net.veth_host, net.veth_node))}


def test_two_port_bases_share_no_name_and_no_subnet() -> None:
    a, b = BedNetwork(2000, 2), BedNetwork(2100, 2)
    assert not _names(a) & _names(b)
    assert a.subnet != b.subnet
    assert (a.head_address, a.node_address(1), a.node_address(2)) == ("10.7.208.1", "10.7.208.11", "10.7.208.12")


def test_names_fit_interface_names_at_the_largest_port_base() -> None:
    assert max(len(name) for name in _names(BedNetwork(65535, 99))) <= 15


def test_a_port_base_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="port base 70000"):
        BedNetwork(70000, 2)
    with pytest.raises(ValueError, match=r"1\.\.200"):
        BedNetwork(2000, 201)


def test_entering_a_node_joins_its_namespace_and_names_the_host() -> None:
    argv = BedNetwork(2000, 2).enter(2, "slinfer-dev-2", [], ["slurmd", "-D"])
    assert argv[:2] == ["nsenter", "--net=/run/netns/slb2000n2"]
    assert argv[argv.index("--hostname") + 1] == "slinfer-dev-2"
    assert argv[-2:] == ["slurmd", "-D"]


def test_expected_lists_what_create_makes_in_the_host_namespace() -> None:
    assert BedNetwork(2000, 2).expected() == ["slb2000br", "slb2000h1", "slb2000h2", "slb2000n1", "slb2000n2"]
