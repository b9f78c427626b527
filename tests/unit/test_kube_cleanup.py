"""`dev-cluster down` removes what its agents published (slinfer/kube/cleanup.py), against the FAKE API server,
and leaves other hosts' objects alone."""

from __future__ import annotations

from pathlib import Path

from slinfer.kube import labels as kl
from slinfer.kube.api import NODE_LEASE_NAMESPACE
from slinfer.kube.cleanup import remove_hosts, remove_published
from slinfer.kube.publisher import NodeIdentity, NodePublisher, PublishedEngine
from tests.fakes.kube import FakeKubeAPI

NS = "slinfer"


async def test_the_beds_hosts_objects_go_and_another_hosts_stay() -> None:
    api = FakeKubeAPI()
    for host, job in (("slinfer-dev", "1"), ("gpu07", "2")):
        pub = NodePublisher(api, NodeIdentity(host, "10.0.0.7"), namespace=NS)
        await pub.reconcile([PublishedEngine(job, "tiny", 20001, True, "alice", "gpu", True)])
    removed = await remove_hosts(api, NS, ["slinfer-dev"])
    assert removed == [f"Pod {NS}/{kl.pod_name('slinfer-dev', '1')}", f"Lease {NODE_LEASE_NAMESPACE}/slinfer-dev",
                       "Node slinfer-dev"]
    assert api.names("Node") == ["slinfer-gpu07"]
    assert api.names("Pod", NS) == [kl.pod_name("slinfer-gpu07", "2")]
    assert api.names("Lease", NODE_LEASE_NAMESPACE) == ["slinfer-gpu07"]
    assert await remove_hosts(api, NS, ["slinfer-dev"]) == []  # nothing left: nothing to say


def test_without_kubernetes_or_without_an_answer_down_goes_on(tmp_path: Path) -> None:
    from tests.fakes.kuberecorder import write_kubeconfig

    off = tmp_path / "off.toml"
    off.write_text("")
    assert remove_published(off, ["slinfer-dev"]) == []
    dead = write_kubeconfig(tmp_path / "kubeconfig", "http://127.0.0.1:9")
    on = tmp_path / "on.toml"
    on.write_text(f'[kubernetes]\nenabled = true\nkubeconfig = "{dead}"\nrequest_timeout_s = 2\n')
    assert remove_published(on, ["slinfer-dev"]) == []  # refused: said on stderr, not raised
