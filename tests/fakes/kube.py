"""A FAKE Kubernetes API server, in memory, implementing slinfer's `KubeAPI` interface.

No real kube-apiserver can run on the test machines (docs/architecture/facts.md), so the logic of the agent's
NodePublisher and the controller's KubeSync is tested against this model of the behaviour they rely on:

- 404 NotFound on get/patch/delete of a missing object; 409 Conflict (AlreadyExists) on create;
- `resourceVersion` (one counter for the whole store, as etcd's), `uid`, `creationTimestamp` from a clock;
- JSON merge patch (RFC 7386) with `metadata.resourceVersion` as a precondition (409 when stale);
- the status subresource: PATCH .../status changes only `status`, a main-resource PATCH ignores `status`;
  creating a Pod resets its status to Pending, creating a Node keeps it (the API server's strategies);
- a Pod's spec cannot be changed (422); deleting a Pod bound to a Node without `gracePeriodSeconds: 0`
  only marks it (deletionTimestamp) because the kubelet that would finish it does not exist;
- equality label selectors (`a=b`, `a==b`, `a!=b`, `a`, `!a`); anything else is a 400;
- garbage collection of objects whose owners are gone, run explicitly (`collect_garbage`) since the real
  collector is asynchronous;
- failure injection: `down` (every call Unavailable) and `fail_next(verb, kind, error)`.

It is a fake: it does not validate objects against schemas (tests do that with kubernetes-validate), has no
watches, admission or RBAC.
"""

from __future__ import annotations

import copy
import datetime as dt
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from slinfer.kube.api import KINDS, Conflict, KubeError, NotFound, Rejected, Unavailable

_WITH_STATUS = {"Pod", "Node", "Service"}


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
    _rv: int = 0
    _injected: list[tuple[str, str, KubeError]] = field(default_factory=list)

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

    def collect_garbage(self) -> list[tuple[str, str, str]]:
        """Deletes objects all of whose ownerReferences point at uids that no longer exist."""
        uids = {o["metadata"]["uid"] for o in self.objects.values()}
        gone = [key for key, o in self.objects.items()
                if (owners := o["metadata"].get("ownerReferences")) and not any(r.get("uid") in uids for r in owners)]
        for key in gone:
            del self.objects[key]
        return gone

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
        meta["resourceVersion"] = self._next_rv()
        if kind == "Pod":
            obj["status"] = {"phase": "Pending"}
        elif kind in _WITH_STATUS and kind != "Node":
            obj.pop("status", None)
        self.objects[key] = obj
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
            if spec != current.get("spec"):
                raise Rejected(f'Pod "{name}" is invalid: spec: Forbidden: pod updates may not change fields '
                               "other than image, activeDeadlineSeconds, tolerations (additions)", 422, "Invalid")
        immutable = {k: current["metadata"][k] for k in ("uid", "creationTimestamp", "namespace", "name")
                     if k in current["metadata"]}
        updated = merge_patch(current, effective)
        updated["metadata"].update(immutable)
        updated["metadata"]["resourceVersion"] = self._next_rv()
        self.objects[(kind, namespace, name)] = updated
        return copy.deepcopy(updated)

    async def delete(self, kind: str, name: str, namespace: str = "", grace_period_s: int | None = None) -> None:
        self._enter("delete", kind, namespace, name, body={"gracePeriodSeconds": grace_period_s})
        current = self._existing(kind, namespace, name)
        if kind == "Pod" and current.get("spec", {}).get("nodeName") and grace_period_s != 0:
            # Graceful deletion of a bound Pod waits for its kubelet, which a slinfer Node does not have.
            current["metadata"].setdefault("deletionTimestamp", _time(self.clock() + (grace_period_s or 30)))
            current["metadata"]["resourceVersion"] = self._next_rv()
            return
        del self.objects[(kind, namespace, name)]

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
