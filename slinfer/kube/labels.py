"""slinfer's names and labels in Kubernetes: the contract between the agent's Pods and the controller's Services.

The agent labels its Node and Pods with these keys and the controller selects and cleans up by them, so both
sides must spell them the same way; this module is that one spelling, plus the rules that turn a Slurm or
model name into a valid Kubernetes name or label value. It builds no objects and makes no calls.
"""

from __future__ import annotations

import hashlib
import re

MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "slinfer"
COMPONENT = "app.kubernetes.io/component"
# kubectl shows node-role.kubernetes.io/<role> in the ROLES column.
NODE_ROLE = "node-role.kubernetes.io/slinfer"
PARTITION = "slinfer.io/partition"
SLURM_NODE = "slinfer.io/slurm-node"
# The keys NVIDIA's GPU feature discovery uses, so existing selectors work on slinfer Nodes too.
GPU_PRODUCT = "nvidia.com/gpu.product"
GPU_COUNT = "nvidia.com/gpu.count"
GPU_RESOURCE = "nvidia.com/gpu"
MODEL = "slinfer.io/model"
JOB_ID = "slinfer.io/job-id"
NODE = "slinfer.io/node"
POOL = "slinfer.io/pool"
# A standby controller's Lease carries role=standby (the leader Lease carries no role).
ROLE = "slinfer.io/role"
# Annotations keep the exact values where a label had to be shortened or cleaned.
MODEL_NAME_ANNOTATION = "slinfer.io/model-name"
JOB_ID_ANNOTATION = "slinfer.io/job-id"
USER_ANNOTATION = "slinfer.io/user"
TAINT_KEY = "slinfer.io/slurm"
# How Kubernetes marks who manages an EndpointSlice: its own EndpointSlice controller copies a Service's labels
# (our managed-by among them) onto the slices it makes, so this label, not ours, says a slice is slinfer's.
SLICE_MANAGED_BY = "endpointslice.kubernetes.io/managed-by"
SLICE_MANAGER = "controller.slinfer.io"
# The field managers of slinfer's writes, so that managedFields tell the agent's from the controller's.
AGENT_FIELD_MANAGER = "slinfer-agent"
CONTROLLER_FIELD_MANAGER = "slinfer-controller"

COMPONENT_NODE = "node"
COMPONENT_ENGINE = "engine"
COMPONENT_MODEL_SERVICE = "model-service"
COMPONENT_GATEWAY = "gateway"
COMPONENT_LEADER = "leader-election"

# The engine container's named port: model Services target it by name, since every engine has its own port.
PORT_NAME = "http"

_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def label_value(text: str) -> str:
    """`text` when it is a valid label value; otherwise a cleaned, shortened form with a hash of the original."""
    if len(text) <= 63 and _LABEL_VALUE.match(text):
        return text
    cleaned = re.sub(r"[^-A-Za-z0-9_.]", "-", text)[:54].strip("-_.")
    return f"{cleaned}-{_digest(text)}" if cleaned else _digest(text)


def is_label_value(text: str) -> bool:
    return len(text) <= 63 and bool(_LABEL_VALUE.match(text))


def dns_label(prefix: str, text: str) -> str:
    """`prefix-text` as a DNS-1123 label (Service names): lower case, at most 63, hashed when it had to change."""
    raw = f"{prefix}-{text}"
    cleaned = re.sub(r"[^a-z0-9-]+", "-", raw.lower()).strip("-")
    if cleaned == raw and len(cleaned) <= 63:
        return cleaned
    return f"{cleaned[:54].strip('-')}-{_digest(raw)}"


def is_dns_label(text: str) -> bool:
    return len(text) <= 63 and bool(_DNS_LABEL.match(text))


def node_name(host: str) -> str:
    """The Kubernetes Node of a Slurm host: `slinfer-<host>`, or the host's own name when it already starts with
    `slinfer-` and is a valid name (the bed's `slinfer-dev` is not doubled to `slinfer-slinfer-dev`)."""
    if host.startswith("slinfer-") and is_dns_label(host):
        return host
    return dns_label("slinfer", host)


def pod_name(node: str, job_id: str) -> str:
    """The Pod of a job's engine on a node (a multi-node job has one per node)."""
    return dns_label(node, f"job-{job_id}")


def model_service_name(model: str) -> str:
    return dns_label("slinfer-model", model)


def model_selector(model: str) -> dict[str, str]:
    """The labels a model's Service selects: pool engines of that model (private engines are the user's)."""
    return {MANAGED_BY: MANAGER, COMPONENT: COMPONENT_ENGINE, MODEL: label_value(model), POOL: "true"}


def selector(labels: dict[str, str]) -> str:
    """An equality label selector string for a list call."""
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
