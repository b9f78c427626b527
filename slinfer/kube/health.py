"""Kubernetes health as an administrator asks for it: is the API server reachable from here, who leads, who
stands by, and which slinfer Nodes renew their Leases.

Responsible for: one read-only probe of the API server with the credentials of the local config's
`[kubernetes]` section (`probe`), and the lines `slinfer status` and `slinfer doctor` print from it
(`status_lines`, `doctor_results`). The controller's own view (its last successful round, failed rounds, writes)
is in its metrics (controller/metrics.py `KubeCollector`). Not responsible for: changing anything in the
cluster, or deciding who leads (leader.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

from slinfer.config import Config
from slinfer.kube import labels as kl
from slinfer.kube.api import (
    NODE_LEASE_NAMESPACE,
    ClientKubeAPI,
    KubeAPI,
    KubeError,
    NotFound,
    Rejected,
    parse_time,
)
from slinfer.kube.leader import LEADER_LEASE

# A probe gives up after this long in all: status and doctor must answer while the API server hangs.
PROBE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class LeaseView:
    """A Lease as the probe read it: whose it is and how long since it was renewed (by this host's clock)."""

    name: str
    holder: str
    age_s: float | None
    duration_s: int

    @property
    def expired(self) -> bool:
        return self.age_s is None or self.age_s > self.duration_s


@dataclass(frozen=True)
class KubeHealth:
    reachable: bool
    error: str = ""
    # None: leader election is off (no leader Lease); holder "" means the Lease is free.
    leader: LeaseView | None = None
    standbys: list[LeaseView] = field(default_factory=list)
    nodes: list[LeaseView] = field(default_factory=list)


def _lease(obj: dict[str, Any], now: float) -> LeaseView:
    spec = obj.get("spec") or {}
    try:
        age: float | None = now - parse_time(str(spec.get("renewTime", "")))
    except ValueError:
        age = None
    return LeaseView(obj["metadata"]["name"], str(spec.get("holderIdentity") or ""), age,
                     int(spec.get("leaseDurationSeconds") or 0))


async def probe(api: KubeAPI, namespace: str, now: float | None = None) -> KubeHealth:
    """Reads the leader Lease, the standbys' Leases and the node Leases, each on its own.

    No answer at all makes `reachable` false with the reason; a read these credentials may not make (an agent's
    kubeconfig on a compute node cannot read the controllers' Leases) is left out and named in `error`.
    """
    now = time.time() if now is None else now
    refused: list[str] = []

    async def read(what: str, call: Awaitable[Any], default: Any) -> Any:
        try:
            return await call
        except NotFound:
            return default
        except Rejected as exc:
            refused.append(f"{what}: {exc}")
            return default

    try:
        leader_obj = await read("the leader Lease", api.get("Lease", LEADER_LEASE, namespace), None)
        standby_objs = await read("standby Leases", api.list("Lease", namespace, kl.selector(
            {kl.MANAGED_BY: kl.MANAGER, kl.COMPONENT: kl.COMPONENT_LEADER, kl.ROLE: "standby"})), [])
        node_objs = await read("node Leases", api.list("Lease", NODE_LEASE_NAMESPACE, kl.selector(
            {kl.MANAGED_BY: kl.MANAGER, kl.COMPONENT: kl.COMPONENT_NODE})), [])
    except KubeError as exc:
        return KubeHealth(reachable=False, error=str(exc))
    return KubeHealth(reachable=True, error="; ".join(refused),
                      leader=_lease(leader_obj, now) if leader_obj is not None else None,
                      standbys=[_lease(o, now) for o in standby_objs], nodes=[_lease(o, now) for o in node_objs])


def probe_config(config: Config) -> KubeHealth | None:
    """The probe with the config's credentials; None when `[kubernetes]` is not enabled."""
    k = config.kubernetes
    if not k.enabled:
        return None
    try:
        api = ClientKubeAPI.from_config(k)
    except KubeError as exc:
        return KubeHealth(reachable=False, error=str(exc))
    try:
        return asyncio.run(asyncio.wait_for(probe(api, k.namespace), PROBE_TIMEOUT_S))
    except TimeoutError:
        return KubeHealth(reachable=False, error=f"no answer within {PROBE_TIMEOUT_S:.0f} s")
    finally:
        api.close()


def _age(view: LeaseView) -> str:
    if view.age_s is None:
        return "never renewed"
    state = "EXPIRED, " if view.expired else ""
    return f"{state}renewed {view.age_s:.0f} s ago"


def status_lines(health: KubeHealth | None, server: str = "") -> list[str]:
    """The Kubernetes section of `slinfer status`."""
    if health is None:
        return []
    where = f" ({server})" if server else ""
    if not health.reachable:
        return ["", f"Kubernetes{where}: API UNREACHABLE: {health.error}"]
    lines = ["", f"Kubernetes{where}: API reachable"]
    if health.leader is None:
        lines.append("  leader: none (leader election off, or no controller has run it yet)")
    else:
        lines.append(f"  leader: {health.leader.holder or 'nobody (the Lease is free)'}, {_age(health.leader)}")
    lines.append("  standbys: " + (", ".join(f"{s.holder} ({_age(s)})" for s in health.standbys) or "none"))
    lines.append("  nodes: " + (", ".join(f"{n.name} ({_age(n)})" for n in health.nodes) or "none published"))
    if health.error:
        lines.append(f"  not readable with these credentials: {health.error}")
    return lines


def doctor_results(health: KubeHealth | None) -> list[tuple[bool, str, str]]:
    """(ok, detail, fix) for `slinfer doctor`'s kubernetes check; empty when Kubernetes is off."""
    if health is None:
        return []
    if not health.reachable:
        return [(False, f"the API server does not answer as configured: {health.error}",
                 "check [kubernetes].kubeconfig, the token's validity and the API server")]
    out = [(True, "API reachable; " + "; ".join(line.strip() for line in status_lines(health)[2:]), "")]
    if health.error:
        out[0] = (True, out[0][1] + " (the head node's credentials read the rest)", "")
    if health.leader is not None and health.leader.holder and health.leader.expired:
        out.append((False, f"the leader {health.leader.holder} has not renewed the Lease for "
                           f"{health.leader.age_s or 0:.0f} s", "check the controllers (slinfer-controller) and "
                                                                "their logs"))
    stale = [n.name for n in health.nodes if n.expired]
    if stale:
        out.append((False, f"node Leases not renewed: {', '.join(stale)} (the controller deletes such Nodes)",
                    "check the agents on those nodes"))
    return out


def doctor_check(config: Config) -> list[tuple[bool, str, str]]:
    """`slinfer doctor`'s kubernetes lines for this host's config (none when Kubernetes is off)."""
    return doctor_results(probe_config(config))


def status_section(config: Config) -> str:
    """`slinfer status`'s Kubernetes section for this host's config ("" when Kubernetes is off)."""
    lines = status_lines(probe_config(config), config.kubernetes.kubeconfig or "in-cluster")
    return "\n".join(lines) + "\n" if lines else ""
