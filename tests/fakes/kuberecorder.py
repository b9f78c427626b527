"""A recording Kubernetes API server for tests: PyPI `kmock`'s KubernetesEmulator on a loopback port.

Not a fake of slinfer's interface: the real official client (through `ClientKubeAPI`, or a separate agent
process given the kubeconfig this writes) sends real HTTP requests, and tests assert the method, path, query
and body of each. kmock keeps the objects it is sent (create, merge-patch, delete) so reads see them; it
does not check resourceVersions, label selectors or schemas.

Use from an async test or fixture:

    async with recording_api_server() as rec:
        write_kubeconfig(tmp_path / "kubeconfig", rec.url)   # for [kubernetes] kubeconfig = "..."
        ...
        assert [r.line for r in rec.requests()] == [...]
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kmock

# What slinfer touches; declared so that listing an empty collection answers [] and not 404.
RESOURCES = ["v1/nodes", "v1/pods", "v1/services", "coordination.k8s.io/v1/leases",
             "discovery.k8s.io/v1/endpointslices"]


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    content_type: str
    body: Any

    @property
    def line(self) -> str:
        """'METHOD /path' for compact sequence assertions."""
        return f"{self.method} {self.path}"


@dataclass
class Recorder:
    handler: kmock.KubernetesEmulator
    url: str

    def requests(self) -> list[Recorded]:
        out = []
        for req in self.handler:
            body: Any = None
            if req.body:
                try:
                    body = json.loads(req.body)
                except ValueError:
                    body = req.body
            out.append(Recorded(str(getattr(req.method, "value", req.method)), req.url.path, dict(req.params),
                                str(req.headers.get("Content-Type", "")), body))
        return out

    def stored(self, resource: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        """The object kmock holds, e.g. stored('v1/pods', 'slinfer', 'x'); None when absent or deleted."""
        key = (kmock.resource(resource), namespace, name)
        if key not in self.handler.objects:
            return None
        obj = self.handler.objects[key]
        return None if obj.deleted else dict(obj.raw)


def kubeconfig(url: str) -> dict[str, Any]:
    """A kubeconfig (as a dict) for a plain-HTTP API server without credentials."""
    return {
        "apiVersion": "v1", "kind": "Config", "current-context": "recorder",
        "clusters": [{"name": "recorder", "cluster": {"server": url}}],
        "users": [{"name": "recorder", "user": {}}],
        "contexts": [{"name": "recorder", "context": {"cluster": "recorder", "user": "recorder"}}],
    }


def write_kubeconfig(path: str | Path, url: str) -> Path:
    """Writes `kubeconfig(url)` (JSON is valid YAML) and returns the path."""
    target = Path(path)
    target.write_text(json.dumps(kubeconfig(url), indent=2))
    return target


@asynccontextmanager
async def recording_api_server(host: str = "127.0.0.1", port: int | None = None) -> AsyncIterator[Recorder]:
    async with kmock.KubernetesEmulator() as handler, kmock.Server(handler, host=host, port=port) as server:
        for resource in RESOURCES:
            handler.resources[resource] = {}
        yield Recorder(handler, str(server.url).rstrip("/"))
