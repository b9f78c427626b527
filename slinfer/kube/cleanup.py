"""Removing what a set of hosts' agents published in Kubernetes, for `slinfer dev-cluster down`.

Responsible for: deleting the engine Pods, the node Lease and the Node of each given Slurm host, with the
credentials of the config's `[kubernetes]` section (the agents' own, which may delete exactly these), and saying
what it removed. An agent that stops cleanly leaves its Node (its engines keep running, to be adopted again);
a bed that goes down takes its engines with it, so nothing would ever remove them. Not responsible for: the
controller's Services (they describe the catalog, not the hosts), or anything of a host it was not given.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterable
from pathlib import Path

from slinfer import config as config_mod
from slinfer.kube import labels as kl
from slinfer.kube.api import NODE_LEASE_NAMESPACE, ClientKubeAPI, KubeAPI, KubeError, NotFound

# down must not wait long on an API server that does not answer.
CLEANUP_TIMEOUT_S = 20.0


async def remove_hosts(api: KubeAPI, namespace: str, hosts: Iterable[str]) -> list[str]:
    """Deletes each host's Pods (at once: no kubelet finishes them), Lease and Node; returns what was removed."""
    removed: list[str] = []
    for host in hosts:
        node = kl.node_name(host)
        for pod in await api.list("Pod", namespace, kl.selector({kl.MANAGED_BY: kl.MANAGER, kl.NODE: node})):
            name = pod["metadata"]["name"]
            try:
                await api.delete("Pod", name, namespace, grace_period_s=0)
                removed.append(f"Pod {namespace}/{name}")
            except NotFound:
                pass
        for kind, ns in (("Lease", NODE_LEASE_NAMESPACE), ("Node", "")):
            try:
                await api.delete(kind, node, ns)
                removed.append(f"{kind} {ns + '/' if ns else ''}{node}")
            except NotFound:
                pass
    return removed


def remove_published(config_path: Path, hosts: Iterable[str]) -> list[str]:
    """What `dev-cluster down` calls: removes the hosts' objects if the config enables Kubernetes; never raises,
    and prints what it removed or why it could not."""
    try:
        config = config_mod.load(str(config_path))
    except (config_mod.ConfigError, OSError):
        return []
    k = config.kubernetes
    if not k.enabled:
        return []
    try:
        api = ClientKubeAPI.from_config(k, field_manager=kl.AGENT_FIELD_MANAGER)
    except KubeError as exc:
        print(f"dev-cluster: Kubernetes objects of the bed left in place: {exc}", file=sys.stderr)
        return []
    try:
        removed = asyncio.run(asyncio.wait_for(remove_hosts(api, k.namespace, list(hosts)), CLEANUP_TIMEOUT_S))
    except (KubeError, TimeoutError) as exc:
        print(f"dev-cluster: Kubernetes objects of the bed left in place: {exc or 'no answer in time'}",
              file=sys.stderr)
        return []
    finally:
        api.close()
    if removed:
        print(f"dev-cluster: removed from Kubernetes: {', '.join(removed)}", file=sys.stderr)
    return removed
