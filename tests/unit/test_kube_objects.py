"""Every object slinfer builds for Kubernetes, validated against the API's schemas with PyPI kubernetes-validate
(strict: unknown fields fail), plus the naming rules JSON schemas do not check (names, label values, times)."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from slinfer.config import MODEL_NAME
from slinfer.kube import labels as kl
from slinfer.kube.api import micro_time, parse_time
from slinfer.kube.leader import LeaderElection
from slinfer.kube.objects import GatewayEndpoint
from slinfer.kube.publisher import NodeIdentity, NodePublisher, PublishedEngine
from slinfer.kube.sync import KubeSync

ROOT = Path(__file__).resolve().parents[2]
# The oldest release slinfer claims (the kubeletVersion it reports) and the newest the validator knows.
VERSIONS = ["1.30", kubernetes_validate.utils.latest_version()]
NOW = 1_700_000_000.0
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                       r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")


def merged(obj: dict[str, Any], status_patch: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(obj)
    out["status"] = status_patch["status"]
    return out


def publisher() -> NodePublisher:
    ident = NodeIdentity.detect("gpu01", "10.0.0.7", "gpu", "NVIDIA H100 80GB HBM3", 4)
    return NodePublisher(None, ident, namespace="slinfer", clock=lambda: NOW)  # type: ignore[arg-type]


def engines() -> list[PublishedEngine]:
    return [PublishedEngine("101", "llama-3.1-8b", 20001, True, "alice", "gpu", True, 2, NOW),
            PublishedEngine("102_7", "Qwen/Qwen2.5-72B-Instruct" * 3, 20002, False, "bob", "", False, 0, 0.0)]


def built_objects() -> list[dict[str, Any]]:
    pub = publisher()
    objs = [merged(pub.node_object(), pub.node_status(NOW)), pub.lease_object(NOW)]
    for e in engines():
        objs.append(merged(pub.pod_object(e), pub.pod_status(e, NOW)))
    for address in ("10.0.0.1", "fd00::1", "head.example.org"):
        ks = KubeSync(None, ["llama-3.1-8b", "x" * 128], None, None, namespace="slinfer",  # type: ignore[arg-type]
                      gateway=GatewayEndpoint(address, 8000))
        objs.extend(obj for _, obj in ks.gateway_objects())
    objs.extend(ks.model_service(m) for m in ["llama-3.1-8b", "x" * 128, "Mixtral_8x7B."])
    objs.append(LeaderElection(None, "slinfer", "head-1234-abcdef").lease_object(NOW))  # type: ignore[arg-type]
    return objs


OBJECTS = built_objects()


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("obj", OBJECTS, ids=[f"{o['kind']}-{o['metadata']['name'][:30]}" for o in OBJECTS])
def test_built_object_is_valid(obj: dict[str, Any], version: str) -> None:
    kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("obj", OBJECTS, ids=[f"{o['kind']}-{o['metadata']['name'][:30]}" for o in OBJECTS])
def test_names_labels_and_times_follow_the_api_rules(obj: dict[str, Any]) -> None:
    meta = obj["metadata"]
    assert len(meta["name"]) <= 63 and DNS_SUBDOMAIN.match(meta["name"])
    for key, value in {**meta.get("labels", {}), **obj.get("spec", {}).get("selector", {})}.items():
        assert LABEL_KEY.match(key), key
        assert kl.is_label_value(value), (key, value)
    spec = obj.get("spec", {})
    for field in ("renewTime", "acquireTime"):
        if field in spec:
            assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$", spec[field])


def test_node_version_is_semver_like() -> None:
    version = publisher().node_status(NOW)["status"]["nodeInfo"]["kubeletVersion"]
    assert re.match(r"^v(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*)?$", version)


def test_delete_options_body_is_valid() -> None:
    # The body ClientKubeAPI.delete sends. Its schema is filed under meta-v1 while the body says v1 (as kubectl's
    # does), which kubernetes-validate's file lookup cannot map, so the same schema files are used directly.
    import jsonschema
    from kubernetes_validate.utils import schema_contents
    from referencing import Registry, Resource

    body = {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0}
    folder = f"kubernetes-json-schema/v{VERSIONS[0]}.0-local-strict"
    schema = schema_contents(f"{folder}/deleteoptions-meta-v1.json", VERSIONS[0])
    registry = Resource.from_contents(schema) @ (
        Resource.from_contents(schema_contents(f"{folder}/_definitions.json", VERSIONS[0])) @ Registry())
    jsonschema.validators.Draft202012Validator(schema, registry=registry).validate(body)
    with pytest.raises(jsonschema.ValidationError):  # the check is real: a misspelt field fails
        jsonschema.validators.Draft202012Validator(schema, registry=registry).validate(
            {**body, "gracePeriodSecond": 0})


@pytest.mark.parametrize("path", sorted((ROOT / "packaging" / "kubernetes").glob("*.yaml")), ids=lambda p: p.name)
@pytest.mark.parametrize("version", VERSIONS)
def test_packaged_manifests_are_valid(path: Path, version: str) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


@given(st.from_regex(MODEL_NAME, fullmatch=True))
def test_every_catalog_model_name_maps_to_a_valid_label_and_service_name(model: str) -> None:
    assert kl.is_label_value(kl.label_value(model))
    assert kl.is_dns_label(kl.model_service_name(model))


@given(st.text(alphabet=st.characters(codec="ascii"), min_size=1, max_size=80))
def test_any_host_and_job_give_valid_node_and_pod_names(text: str) -> None:
    node = kl.node_name(text)
    assert kl.is_dns_label(node)
    assert kl.is_dns_label(kl.pod_name(node, text))


def test_distinct_models_get_distinct_labels_when_shortened() -> None:
    a, b = "m" * 100 + "a", "m" * 100 + "b"
    assert kl.label_value(a) != kl.label_value(b)
    assert kl.model_service_name(a) != kl.model_service_name(b)
    assert kl.model_service_name("Llama") != kl.model_service_name("llama")


def test_micro_time_round_trips() -> None:
    for ts in (NOW, NOW + 0.5, NOW + 0.000001):
        assert abs(parse_time(micro_time(ts)) - ts) < 1e-6


def test_manifests_exist() -> None:
    names = {p.name for p in (ROOT / "packaging" / "kubernetes").glob("*.yaml")}
    assert {"namespace.yaml", "agent-rbac.yaml", "controller-rbac.yaml"} <= names
    for path in (ROOT / "packaging" / "kubernetes").glob("*.yaml"):
        yaml.safe_load_all(path.read_text())


def test_node_names_do_not_double_the_prefix() -> None:
    assert kl.node_name("gpu01") == "slinfer-gpu01"
    assert kl.node_name("slinfer-dev") == "slinfer-dev"
    assert kl.node_name("slinfer-Dev").startswith("slinfer-slinfer-dev-")  # not a valid name: cleaned and hashed


def test_node_capacity_has_cpu_and_memory_from_the_host() -> None:
    from slinfer.kube.objects import NodeIdentity, node_status

    ident = NodeIdentity.detect("gpu01", "10.0.0.7", gpu_count=2)
    assert ident.cpus >= 1 and ident.memory_kib > 0
    capacity = node_status(ident, 1_700_000_000.0, 1_700_000_000.0)["status"]["capacity"]
    assert capacity["cpu"] == str(ident.cpus) and capacity["memory"] == f"{ident.memory_kib}Ki"
    assert capacity["nvidia.com/gpu"] == "2"
    bare = node_status(NodeIdentity("gpu01", "10.0.0.7"), 0.0, 0.0)["status"]["capacity"]
    assert "cpu" not in bare and "memory" not in bare
