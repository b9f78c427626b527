"""The one small interface slinfer has to a Kubernetes API server.

`KubeAPI` is the handful of calls the agent and the controller make (get, list, create, JSON merge patch,
delete) on the few kinds they touch, with plain JSON dicts in and out and every failure mapped to one of
four exception types. `ClientKubeAPI` implements it over the official `kubernetes` client: the client
loads the kubeconfig or in-cluster credentials and does TLS, auth and transport; the sync calls run in a
thread. Bodies are sent exactly as built: the typed client methods round-trip bodies through models and
re-format timestamps with `isoformat()`, which drops the fraction of a Lease's `renewTime` when it is zero
and the API server then rejects it (docs/architecture/facts.md), so requests go through `ApiClient.call_api`.

This module does not decide what objects look like (the agent's NodePublisher and the controller's
KubeSync do) and does not retry: callers back off.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, urlencode

from slinfer.config import KubernetesConfig

# The namespace where Kubernetes keeps node heartbeats.
NODE_LEASE_NAMESPACE = "kube-node-lease"

MERGE_PATCH = "application/merge-patch+json"


@dataclass(frozen=True)
class Kind:
    api_version: str
    plural: str
    namespaced: bool


KINDS: dict[str, Kind] = {
    "Node": Kind("v1", "nodes", False),
    "Pod": Kind("v1", "pods", True),
    "Service": Kind("v1", "services", True),
    "Lease": Kind("coordination.k8s.io/v1", "leases", True),
    "EndpointSlice": Kind("discovery.k8s.io/v1", "endpointslices", True),
}


class KubeError(Exception):
    """A failed API call; `status` is the HTTP status (0 when no answer came)."""

    def __init__(self, message: str, status: int = 0, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


class NotFound(KubeError):
    """404: the object (or its namespace) does not exist."""


class Conflict(KubeError):
    """409: the object already exists (create), or its resourceVersion moved on (patch with a precondition)."""


class Unavailable(KubeError):
    """No usable answer: connection refused, timeout, TLS failure, 429 or 5xx. Retrying later may work."""


class Rejected(KubeError):
    """The server understood and refused: 400, 401, 403, 422 and the like (bad object, missing RBAC)."""


def resource_path(kind: str, namespace: str = "", name: str = "", subresource: str = "") -> str:
    """The REST path of a kind, a namespace's collection, an object, or one of its subresources."""
    k = KINDS[kind]
    if k.namespaced and not namespace:
        raise ValueError(f"{kind} is namespaced: a namespace is required")
    if not k.namespaced and namespace:
        raise ValueError(f"{kind} is cluster-scoped: no namespace")
    root = "/api/v1" if k.api_version == "v1" else f"/apis/{k.api_version}"
    path = root + (f"/namespaces/{quote(namespace, safe='')}" if namespace else "") + f"/{k.plural}"
    if name:
        path += f"/{quote(name, safe='')}"
        if subresource:
            path += f"/{subresource}"
    return path


def micro_time(ts: float) -> str:
    """A MicroTime (Lease renewTime/acquireTime): always six fraction digits, as the API server insists."""
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def rfc3339(ts: float) -> str:
    """A Time (conditions, startTime): whole seconds."""
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> float:
    """Unix seconds from a Time or MicroTime string; ValueError when it is neither."""
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


class KubeAPI(Protocol):
    """What slinfer needs from an API server. Objects are JSON dicts as the API spells them."""

    async def get(self, kind: str, name: str, namespace: str = "") -> dict[str, Any]: ...

    async def list(self, kind: str, namespace: str = "", label_selector: str = "") -> list[dict[str, Any]]: ...

    async def create(self, kind: str, body: dict[str, Any], namespace: str = "") -> dict[str, Any]: ...

    async def patch(self, kind: str, name: str, patch: dict[str, Any], namespace: str = "",
                    subresource: str = "") -> dict[str, Any]:
        """A JSON merge patch (RFC 7386). A `metadata.resourceVersion` in it is a precondition (409 if stale)."""
        ...

    async def delete(self, kind: str, name: str, namespace: str = "", grace_period_s: int | None = None) -> None: ...


class ClientKubeAPI:
    """KubeAPI over the official client's ApiClient; each call runs in a worker thread."""

    def __init__(self, api_client: Any, request_timeout_s: float = 10.0, field_manager: str = "") -> None:
        self._client = api_client
        self._timeout = request_timeout_s
        # Named on every write, so managedFields tell the agent's writes from the controller's (without it the
        # server records the client's User-Agent, `OpenAPI-Generator`, for both).
        self._writer = {"fieldManager": field_manager} if field_manager else {}

    @classmethod
    def from_config(cls, config: KubernetesConfig, field_manager: str = "") -> ClientKubeAPI:
        """Loads `config.kubeconfig`, or the in-cluster service account when it is empty.

        Raises Rejected naming the problem when credentials cannot be loaded (the caller decides whether that
        is fatal; a kubeconfig that exists but points at a dead server loads fine and fails per call).
        """
        import yaml
        from kubernetes import client
        from kubernetes import config as kconfig

        configuration = client.Configuration()
        try:
            if config.kubeconfig:
                kconfig.load_kube_config(config_file=config.kubeconfig, client_configuration=configuration)
            else:
                kconfig.load_incluster_config(client_configuration=configuration)
        except (kconfig.ConfigException, OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as exc:
            where = config.kubeconfig or "in-cluster service account"
            raise Rejected(f"cannot load Kubernetes credentials from {where}: {exc}") from exc
        # No hidden retries inside a call (urllib3 would try 4 times, each up to the timeout): callers back off.
        configuration.retries = False
        token_file = _token_file(config.kubeconfig) if config.kubeconfig else ""
        if token_file:
            configuration.refresh_api_key_hook = TokenFile(token_file)
        return cls(client.ApiClient(configuration), config.request_timeout_s, field_manager)

    def close(self) -> None:
        self._client.close()

    async def get(self, kind: str, name: str, namespace: str = "") -> dict[str, Any]:
        return await self._call("GET", resource_path(kind, namespace, name))

    async def list(self, kind: str, namespace: str = "", label_selector: str = "") -> list[dict[str, Any]]:
        query = {"labelSelector": label_selector} if label_selector else {}
        answer = await self._call("GET", resource_path(kind, namespace), query=query)
        items = answer.get("items") or []
        return [item for item in items if isinstance(item, dict)]

    async def create(self, kind: str, body: dict[str, Any], namespace: str = "") -> dict[str, Any]:
        return await self._call("POST", resource_path(kind, namespace), query=self._writer, body=body)

    async def patch(self, kind: str, name: str, patch: dict[str, Any], namespace: str = "",
                    subresource: str = "") -> dict[str, Any]:
        return await self._call("PATCH", resource_path(kind, namespace, name, subresource), query=self._writer,
                                body=patch, content_type=MERGE_PATCH)

    async def delete(self, kind: str, name: str, namespace: str = "", grace_period_s: int | None = None) -> None:
        body: dict[str, Any] = {"apiVersion": "v1", "kind": "DeleteOptions"}
        if grace_period_s is not None:
            body["gracePeriodSeconds"] = grace_period_s
        await self._call("DELETE", resource_path(kind, namespace, name), body=body)

    async def _call(self, method: str, path: str, query: dict[str, str] | None = None,
                    body: dict[str, Any] | None = None, content_type: str = "application/json") -> dict[str, Any]:
        return await asyncio.to_thread(self._call_sync, method, path, query or {}, body, content_type)

    def _call_sync(self, method: str, path: str, query: dict[str, str], body: dict[str, Any] | None,
                   content_type: str) -> dict[str, Any]:
        import urllib3
        from kubernetes.client.exceptions import ApiException

        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        where = f"{method} {path}"
        try:
            method, url, headers, _, _ = self._client.param_serialize(
                method=method, resource_path=path, header_params=headers, auth_settings=["BearerToken"])
            if query:
                url += "?" + urlencode(query)
            # The body bypasses param_serialize so that nothing re-formats it.
            response = self._client.call_api(method, url, header_params=headers, body=body,
                                             _request_timeout=self._timeout)
            response.read()
        except ApiException as exc:  # raised by the client for TLS failures, with status 0
            raise Unavailable(f"{where}: {exc.reason}", exc.status or 0) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise Unavailable(f"{where}: {type(exc).__name__}: {exc}") from exc
        status = response.status
        text = (response.data or b"").decode("utf-8", "replace")
        if 200 <= status < 300:
            try:
                answer = json.loads(text) if text else {}
            except json.JSONDecodeError as exc:
                raise Unavailable(f"{where}: answer is not JSON: {text[:200]!r}", status) from exc
            return answer if isinstance(answer, dict) else {}
        raise _error(where, status, text)


def _token_file(kubeconfig: str) -> str:
    """The `tokenFile` of the kubeconfig's current user ("" when it has none), as an absolute path."""
    import yaml

    try:
        doc = yaml.safe_load(Path(kubeconfig).read_text()) or {}
        context = next(c["context"] for c in doc.get("contexts") or []
                       if c.get("name") == doc.get("current-context"))
        user = next(u["user"] for u in doc.get("users") or [] if u.get("name") == context.get("user"))
    except (OSError, yaml.YAMLError, StopIteration, KeyError, TypeError, AttributeError):
        return ""
    path = str((user or {}).get("tokenFile") or "")
    return str(Path(kubeconfig).parent / path) if path else ""


class TokenFile:
    """Reads a kubeconfig user's `tokenFile` again whenever the file changes (the official client reads it once):
    a short-lived TokenRequest token (`kubectl create token`) can then be replaced in place without a restart."""

    def __init__(self, path: str) -> None:
        self._path = Path(path)
        self._seen: tuple[float, int] | None = None

    def __call__(self, configuration: Any) -> None:
        try:
            st = self._path.stat()
            if (st.st_mtime, st.st_size) == self._seen:
                return
            token = self._path.read_text().strip()
        except OSError:
            return  # keep the last token; the server's 401 says the rest
        self._seen = (st.st_mtime, st.st_size)
        configuration.api_key["BearerToken"] = f"Bearer {token}"


def _error(where: str, status: int, text: str) -> KubeError:
    reason, message = "", text[:500]
    try:
        answer = json.loads(text)
        if isinstance(answer, dict):
            reason = str(answer.get("reason", ""))
            message = str(answer.get("message", message))
    except json.JSONDecodeError:
        pass
    detail = f"{where}: {status} {reason}: {message}".strip()
    if status == 404:
        return NotFound(detail, status, reason)
    if status == 409:
        return Conflict(detail, status, reason)
    if status == 429 or status >= 500:
        return Unavailable(detail, status, reason)
    return Rejected(detail, status, reason)
