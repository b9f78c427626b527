"""A FAKE Kubernetes API server, in memory, implementing slinfer's `KubeAPI` interface.

CI has no kube-apiserver (docs/architecture/facts.md; one was built here by hand for issue 32), so the logic of
the agent's NodePublisher and the controller's KubeSync is tested against this model of the behaviour a real
server showed:

- 404 NotFound on get/patch/delete of a missing object; 409 Conflict (AlreadyExists) on create;
- `resourceVersion` (one counter for the whole store, as etcd's), `uid`, `creationTimestamp` from a clock;
- JSON merge patch (RFC 7386) with `metadata.resourceVersion` as a precondition (409 when stale);
- the status subresource: PATCH .../status changes only `status`, a main-resource PATCH ignores `status`;
  creating a Pod resets its status to Pending, creating a Node keeps it (the API server's strategies);
- a Pod's spec cannot be changed (422); deleting a Pod bound to a Node without `gracePeriodSeconds: 0`
  only marks it (deletionTimestamp) because the kubelet that would finish it does not exist;
- equality label selectors (`a=b`, `a==b`, `a!=b`, `a`, `!a`); anything else is a 400;
- garbage collection of objects whose owners are gone, run explicitly (`collect_garbage`) since the real
  collector is asynchronous: like the real one it deletes in the background with the default grace, so a
  bound Pod is only marked Terminating (no kubelet will finish it); then the pod GC deletes Pods bound to a
  Node that does not exist, and skips those whose Node (of the same name) exists again;
- defaults filled in on write, as the API server's defaulting does (a Service's `type`, `sessionAffinity`,
  `clusterIP`, each port's `protocol` and `targetPort`, also on an ExternalName Service; a Pod's
  `dnsPolicy`, `schedulerName`, `terminationGracePeriodSeconds`, each container's `imagePullPolicy`), so a
  client that compares what it wants with what is stored sees what a real server would show it;
- the EndpointSlice controller: every Service with a selector gets a slice `<service>-<random>` carrying
  the Service's labels, `kubernetes.io/service-name` and `endpointslice.kubernetes.io/managed-by:
  endpointslice-controller.k8s.io`, made again after any write when someone deleted it, removed with its
  Service; slices managed by anyone else are left alone;
- 422 for an EndpointSlice address in the loopback, link-local or unspecified range;
- Pod Security admission: a Pod created in a namespace labelled `pod-security.kubernetes.io/enforce` at
  `baseline` or `restricted` (see `namespace_labels`) is refused with 403 when it uses host namespaces,
  host ports or privileged containers; no label, or `privileged`, admits it;
- field managers: each write records its manager in `metadata.managedFields` (the `fieldManager` the
  client named, else `OpenAPI-Generator`, which the official Python client's User-Agent gives);
  `view(manager)` is a client of the same store that names its manager on every write;
- failure injection: `down` (every call Unavailable) and `fail_next(verb, kind, error)`.

It is a fake: it does not validate objects against schemas (tests do that with kubernetes-validate), has no
watches or RBAC, and its defaulting and admission cover the fields above, not the whole API.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import ipaddress
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from slinfer.kube.api import KINDS, Conflict, KubeError, NotFound, Rejected, Unavailable

_WITH_STATUS = {"Pod", "Node", "Service"}
# The manager a real server records for the official Python client when no fieldManager is given.
DEFAULT_MANAGER = "OpenAPI-Generator"
# The labels the real EndpointSlice controller puts on the slices it makes.
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
SLICE_MANAGED_BY = "endpointslice.kubernetes.io/managed-by"
SLICE_CONTROLLER = "endpointslice-controller.k8s.io"
# Pod Security admission's namespace label and the levels that refuse host namespaces and host ports.
PSA_ENFORCE = "pod-security.kubernetes.io/enforce"
_PSA_STRICT = ("baseline", "restricted")
# The default grace of a Pod deletion (terminationGracePeriodSeconds' default).
DEFAULT_GRACE_S = 30


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def matches(labels: dict[str, str], selector: str) -> bool:
    """Equality-based label selector semantics; Rejected (400) for syntax this fake does not model."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if " in " in term or " notin " in term or "(" in term:
            raise Rejected(f"label selector {term!r}: set-based selectors are not modelled", 400, "BadRequest")
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term not in labels:
            return False
    return True


@dataclass
class Call:
    verb: str
    kind: str
    namespace: str
    name: str
    subresource: str = ""
    body: dict[str, Any] | None = None


@dataclass
class FakeKubeAPI:
    """The fake API server. `objects` maps (kind, namespace, name) to the stored object."""

    clock: Callable[[], float] = time.time
    objects: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    down: bool = False
    # Labels of namespaces (for Pod Security admission); a namespace not listed has none.
    namespace_labels: dict[str, dict[str, str]] = field(default_factory=dict)
    _rv: int = 0
    _injected: list[tuple[str, str, KubeError]] = field(default_factory=list)
    _manager: str = ""
    _ips: int = 0

    def view(self, field_manager: str) -> FakeKubeView:
        """A client of this same store whose writes name `field_manager` (as ClientKubeAPI's do)."""
        return FakeKubeView(self, field_manager)

    def managers(self, kind: str, name: str, namespace: str = "") -> list[str]:
        """The field managers recorded on a stored object, in the order they first wrote it."""
        obj = self.objects.get((kind, namespace, name)) or {}
        return [str(m.get("manager")) for m in obj.get("metadata", {}).get("managedFields") or []]

    # Test controls.

    def fail_next(self, verb: str, kind: str, error: KubeError) -> None:
        """The next call with this verb ('get', 'list', 'create', 'patch', 'delete') on `kind` raises `error`."""
        self._injected.append((verb, kind, error))

    def stored(self, kind: str, name: str, namespace: str = "") -> dict[str, Any] | None:
        obj = self.objects.get((kind, namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def names(self, kind: str, namespace: str | None = None) -> list[str]:
        return sorted(n for (k, ns, n) in self.objects if k == kind and (namespace is None or ns == namespace))

    def verbs(self, kind: str | None = None) -> list[str]:
        return [f"{c.verb} {c.kind}{'/' + c.subresource if c.subresource else ''} {c.name}".strip()
                for c in self.calls if kind is None or c.kind == kind]

    def collect_garbage(self, pod_gc: bool = True) -> list[tuple[str, str, str]]:
        """One pass of the cluster's garbage collector, then of its pod GC; returns the keys deleted or marked.

        Dependents all of whose ownerReferences point at uids that no longer exist are deleted in the
        background with the default grace: a Pod bound to a Node is only marked (deletionTimestamp), as its
        kubelet would have to finish it. Then Pods bound to a Node name that does not exist are deleted
        outright (the pod GC's orphan rule); one whose Node name exists again is left as it is. `pod_gc=False`
        runs the garbage collector alone: the real pod GC waits out a quarantine first.
        """
        uids = {o["metadata"]["uid"] for o in self.objects.values()}
        gone = [key for key, o in self.objects.items()
                if (owners := o["metadata"].get("ownerReferences")) and not any(r.get("uid") in uids for r in owners)]
        for key in gone:
            obj = self.objects[key]
            if key[0] == "Pod" and obj.get("spec", {}).get("nodeName"):
                self._mark_deleted(obj, DEFAULT_GRACE_S)
            else:
                del self.objects[key]
        nodes = {n for (k, _, n) in self.objects if k == "Node"}
        orphans = [key for key, o in self.objects.items()
                   if pod_gc and key[0] == "Pod" and (node := o.get("spec", {}).get("nodeName"))
                   and node not in nodes]
        for key in orphans:
            del self.objects[key]
        self._endpointslice_controller()
        return sorted(set(gone) | set(orphans))

    # The KubeAPI interface.

    async def get(self, kind: str, name: str, namespace: str = "") -> dict[str, Any]:
        self._enter("get", kind, namespace, name)
        return copy.deepcopy(self._existing(kind, namespace, name))

    async def list(self, kind: str, namespace: str = "", label_selector: str = "") -> list[dict[str, Any]]:
        self._enter("list", kind, namespace, "")
        return [copy.deepcopy(o) for (k, ns, _), o in sorted(self.objects.items())
                if k == kind and (not namespace or ns == namespace)
                and matches(o["metadata"].get("labels") or {}, label_selector)]

    async def create(self, kind: str, body: dict[str, Any], namespace: str = "") -> dict[str, Any]:
        name = str(body.get("metadata", {}).get("name", ""))
        self._enter("create", kind, namespace, name, body=body)
        if not name:
            raise Rejected(f"{kind}: metadata.name: Required value", 422, "Invalid")
        if body.get("kind") != kind:
            raise Rejected(f"kind {body.get('kind')!r} sent to the {kind} collection", 400, "BadRequest")
        body_ns = body.get("metadata", {}).get("namespace", "")
        if body_ns and body_ns != namespace:
            raise Rejected(f"the namespace of the object ({body_ns}) does not match the request ({namespace})",
                           400, "BadRequest")
        key = (kind, namespace, name)
        if key in self.objects:
            raise Conflict(f'{kind} "{name}" already exists', 409, "AlreadyExists")
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if namespace:
            meta["namespace"] = namespace
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _time(self.clock())
        if kind == "Pod":
            obj["status"] = {"phase": "Pending"}
            self._admit_pod(obj, namespace)
        elif kind in _WITH_STATUS and kind != "Node":
            obj.pop("status", None)
        self._default(kind, obj, None)
        self._validate(kind, obj)
        meta["resourceVersion"] = self._next_rv()
        self._record_manager(obj, "")
        self.objects[key] = obj
        self._endpointslice_controller()
        return copy.deepcopy(obj)

    async def patch(self, kind: str, name: str, patch: dict[str, Any], namespace: str = "",
                    subresource: str = "") -> dict[str, Any]:
        self._enter("patch", kind, namespace, name, subresource, patch)
        if subresource and (subresource != "status" or kind not in _WITH_STATUS):
            raise NotFound(f"{kind} has no subresource {subresource!r}", 404, "NotFound")
        current = self._existing(kind, namespace, name)
        wanted_rv = (patch.get("metadata") or {}).get("resourceVersion")
        if wanted_rv is not None and wanted_rv != current["metadata"]["resourceVersion"]:
            raise Conflict(f'Operation cannot be fulfilled on {kind} "{name}": the object has been modified; '
                           "please apply your changes to the latest version and try again", 409, "Conflict")
        if subresource == "status":
            effective = {"status": patch.get("status")} if "status" in patch else {}
        else:
            effective = {k: v for k, v in patch.items() if not (k == "status" and kind in _WITH_STATUS)}
        if kind == "Pod" and "spec" in effective:
            spec = merge_patch(current.get("spec"), effective["spec"])
            scratch = {"spec": spec}
            self._default("Pod", scratch, None)
            if scratch["spec"] != current.get("spec"):
                raise Rejected(f'Pod "{name}" is invalid: spec: Forbidden: pod updates may not change fields '
                               "other than image, activeDeadlineSeconds, tolerations (additions)", 422, "Invalid")
        immutable = {k: current["metadata"][k]
                     for k in ("uid", "creationTimestamp", "namespace", "name", "deletionTimestamp",
                               "deletionGracePeriodSeconds", "managedFields")
                     if k in current["metadata"]}
        updated = merge_patch(current, effective)
        updated["metadata"].update(immutable)
        self._default(kind, updated, current)
        self._validate(kind, updated)
        if updated == current:
            # A no-op write: the real server stores nothing and keeps the resourceVersion.
            return copy.deepcopy(current)
        updated["metadata"]["resourceVersion"] = self._next_rv()
        self._record_manager(updated, subresource)
        self.objects[(kind, namespace, name)] = updated
        self._endpointslice_controller()
        return copy.deepcopy(updated)

    async def delete(self, kind: str, name: str, namespace: str = "", grace_period_s: int | None = None) -> None:
        self._enter("delete", kind, namespace, name, body={"gracePeriodSeconds": grace_period_s})
        current = self._existing(kind, namespace, name)
        if kind == "Pod" and current.get("spec", {}).get("nodeName") and grace_period_s != 0:
            # Graceful deletion of a bound Pod waits for its kubelet, which a slinfer Node does not have.
            self._mark_deleted(current, grace_period_s)
            return
        del self.objects[(kind, namespace, name)]
        self._endpointslice_controller()

    # Internals.

    def _enter(self, verb: str, kind: str, namespace: str, name: str, subresource: str = "",
               body: dict[str, Any] | None = None) -> None:
        self.calls.append(Call(verb, kind, namespace, name, subresource, copy.deepcopy(body)))
        if kind not in KINDS:
            raise NotFound(f"the server could not find the requested resource ({kind})", 404, "NotFound")
        if KINDS[kind].namespaced != bool(namespace) and not (verb == "list" and not namespace):
            raise Rejected(f"{kind}: namespace {namespace!r} does not fit its scope", 400, "BadRequest")
        if self.down:
            raise Unavailable(f"{verb} {kind} {name}: connection refused (fake API is down)")
        for i, (v, k, error) in enumerate(self._injected):
            if v == verb and k == kind:
                del self._injected[i]
                raise error

    def _mark_deleted(self, obj: dict[str, Any], grace_s: int | None) -> None:
        grace = DEFAULT_GRACE_S if grace_s is None else grace_s
        meta = obj["metadata"]
        if "deletionTimestamp" not in meta:
            meta["deletionTimestamp"] = _time(self.clock() + grace)
            meta["deletionGracePeriodSeconds"] = grace
            meta["resourceVersion"] = self._next_rv()

    def _record_manager(self, obj: dict[str, Any], subresource: str) -> None:
        manager = self._manager or DEFAULT_MANAGER
        entries = obj["metadata"].setdefault("managedFields", [])
        entry = {"manager": manager, "operation": "Update", "apiVersion": KINDS.get(
            str(obj.get("kind")), KINDS["Pod"]).api_version, "time": _time(self.clock()),
            **({"subresource": subresource} if subresource else {})}
        for i, old in enumerate(entries):
            if old.get("manager") == manager and old.get("subresource", "") == subresource:
                entries[i] = entry
                return
        entries.append(entry)

    def _default(self, kind: str, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        """The API server's defaulting of the fields slinfer sets (and a ClusterIP kept across updates)."""
        spec = obj.get("spec")
        if kind == "Service" and isinstance(spec, dict):
            spec.setdefault("type", "ClusterIP")
            spec.setdefault("sessionAffinity", "None")
            for port in spec.get("ports") or []:
                port.setdefault("protocol", "TCP")
                port.setdefault("targetPort", port.get("port"))
            if spec["type"] == "ClusterIP":
                old_spec = (old or {}).get("spec") or {}
                if "clusterIP" not in spec:
                    spec["clusterIP"] = old_spec.get("clusterIP") or self._next_ip()
                spec.setdefault("clusterIPs", [spec["clusterIP"]])
                spec.setdefault("ipFamilies", ["IPv4"])
                spec.setdefault("ipFamilyPolicy", "SingleStack")
                spec.setdefault("internalTrafficPolicy", "Cluster")
        elif kind == "Pod" and isinstance(spec, dict):
            spec.setdefault("restartPolicy", "Always")
            spec.setdefault("dnsPolicy", "ClusterFirst")
            spec.setdefault("schedulerName", "default-scheduler")
            spec.setdefault("terminationGracePeriodSeconds", DEFAULT_GRACE_S)
            spec.setdefault("securityContext", {})
            for container in spec.get("containers") or []:
                container.setdefault("imagePullPolicy", "IfNotPresent")
                container.setdefault("terminationMessagePath", "/dev/termination-log")
                container.setdefault("terminationMessagePolicy", "File")
                for port in container.get("ports") or []:
                    port.setdefault("protocol", "TCP")
        elif kind == "EndpointSlice":
            for port in obj.get("ports") or []:
                port.setdefault("protocol", "TCP")

    def _validate(self, kind: str, obj: dict[str, Any]) -> None:
        if kind != "EndpointSlice":
            return
        for i, endpoint in enumerate(obj.get("endpoints") or []):
            for j, address in enumerate(endpoint.get("addresses") or []):
                try:
                    ip = ipaddress.ip_address(address)
                except ValueError:
                    continue
                where = ("loopback" if ip.is_loopback else "link-local" if ip.is_link_local else
                         "unspecified" if ip.is_unspecified else "")
                if where:
                    name = obj["metadata"].get("name", "")
                    raise Rejected(f'EndpointSlice.discovery.k8s.io "{name}" is invalid: endpoints[{i}].addresses'
                                   f'[{j}]: Invalid value: "{address}": may not be in the {where} range',
                                   422, "Invalid")

    def _admit_pod(self, pod: dict[str, Any], namespace: str) -> None:
        level = self.namespace_labels.get(namespace, {}).get(PSA_ENFORCE, "")
        if level not in _PSA_STRICT:
            return
        spec = pod.get("spec") or {}
        problems = []
        host = [f"{k}=true" for k in ("hostNetwork", "hostPID", "hostIPC") if spec.get(k)]
        if host:
            problems.append(f"host namespaces ({', '.join(host)})")
        for c in spec.get("containers") or []:
            ports = [str(p["hostPort"]) for p in c.get("ports") or [] if p.get("hostPort")]
            if ports:
                problems.append(f'hostPort (container "{c.get("name")}" uses hostPort {", ".join(ports)})')
            if (c.get("securityContext") or {}).get("privileged"):
                problems.append(f'privileged (container "{c.get("name")}" must not set privileged=true)')
        if problems:
            name = pod["metadata"].get("name", "")
            raise Rejected(f'pods "{name}" is forbidden: violates PodSecurity "{level}:latest": '
                           + ", ".join(problems), 403, "Forbidden")

    def _endpointslice_controller(self) -> None:
        """What the cluster's EndpointSlice controller would have done by now, for Services with a selector."""
        services = {(ns, n): o for (k, ns, n), o in self.objects.items()
                    if k == "Service" and (o.get("spec") or {}).get("selector")}
        made: dict[tuple[str, str], tuple[str, str, str]] = {}
        for key, o in list(self.objects.items()):
            labels = o["metadata"].get("labels") or {}
            if key[0] != "EndpointSlice" or labels.get(SLICE_MANAGED_BY) != SLICE_CONTROLLER:
                continue
            owner = (key[1], labels.get(SERVICE_NAME_LABEL, ""))
            if owner not in services:
                del self.objects[key]
            else:
                made[owner] = key
        for (ns, name), service in services.items():
            pods = [p for (k, pns, _), p in sorted(self.objects.items()) if k == "Pod" and pns == ns
                    and not p["metadata"].get("deletionTimestamp")
                    and matches(p["metadata"].get("labels") or {},
                                ",".join(f"{a}={b}" for a, b in service["spec"]["selector"].items()))]
            endpoints = [{"addresses": [str(p["status"]["podIP"])],
                          "conditions": {"ready": any(c.get("type") == "Ready" and c.get("status") == "True"
                                                      for c in p["status"].get("conditions") or [])},
                          "nodeName": p["spec"].get("nodeName", ""),
                          "targetRef": {"kind": "Pod", "name": p["metadata"]["name"], "namespace": ns}}
                         for p in pods if (p.get("status") or {}).get("podIP")]
            labels = {**(service["metadata"].get("labels") or {}), SERVICE_NAME_LABEL: name,
                      SLICE_MANAGED_BY: SLICE_CONTROLLER}
            key = made.get((ns, name))
            if key is None:
                suffix = hashlib.sha256(f"{name}-{self._rv}".encode()).hexdigest()[:5]
                key = ("EndpointSlice", ns, f"{name}-{suffix}")
                self.objects[key] = {
                    "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {"name": key[2], "namespace": ns, "uid": str(uuid.uuid4()),
                                 "creationTimestamp": _time(self.clock()), "resourceVersion": self._next_rv(),
                                 "generateName": f"{name}-",
                                 "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": name,
                                                      "uid": service["metadata"]["uid"], "controller": True}],
                                 "managedFields": [{"manager": "endpointslice-controller", "operation": "Update"}]},
                    "addressType": "IPv4"}
            obj = self.objects[key]
            if obj["metadata"].get("labels") != labels or obj.get("endpoints") != endpoints:
                obj["metadata"]["labels"] = labels
                obj["endpoints"] = endpoints
                obj["ports"] = [{"name": p.get("name", ""), "port": p.get("targetPort"), "protocol": "TCP"}
                                for p in service["spec"].get("ports") or []]
                obj["metadata"]["resourceVersion"] = self._next_rv()

    def _next_ip(self) -> str:
        self._ips += 1
        return f"10.96.{self._ips // 250}.{self._ips % 250 + 1}"

    def _existing(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        obj = self.objects.get((kind, namespace, name))
        if obj is None:
            raise NotFound(f'{kind.lower()}s "{name}" not found', 404, "NotFound")
        return obj

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)


def _time(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class FakeKubeView:
    """A client of a FakeKubeAPI's store that names its field manager on every write (ClientKubeAPI's role)."""

    def __init__(self, store: FakeKubeAPI, field_manager: str) -> None:
        self.store = store
        self.field_manager = field_manager

    async def get(self, kind: str, name: str, namespace: str = "") -> dict[str, Any]:
        return await self.store.get(kind, name, namespace)

    async def list(self, kind: str, namespace: str = "", label_selector: str = "") -> list[dict[str, Any]]:
        return await self.store.list(kind, namespace, label_selector)

    async def create(self, kind: str, body: dict[str, Any], namespace: str = "") -> dict[str, Any]:
        # The store's methods do not await inside, so the manager cannot leak into another caller's write.
        self.store._manager = self.field_manager
        try:
            return await self.store.create(kind, body, namespace)
        finally:
            self.store._manager = ""

    async def patch(self, kind: str, name: str, patch: dict[str, Any], namespace: str = "",
                    subresource: str = "") -> dict[str, Any]:
        self.store._manager = self.field_manager
        try:
            return await self.store.patch(kind, name, patch, namespace, subresource)
        finally:
            self.store._manager = ""

    async def delete(self, kind: str, name: str, namespace: str = "", grace_period_s: int | None = None) -> None:
        await self.store.delete(kind, name, namespace, grace_period_s)
