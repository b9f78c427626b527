"""The controller's Prometheus series, served by the gateway at `/metrics`.

Event series (requests, latency, time to first byte, retries, scaling decisions) are module-level objects
in `REGISTRY`, incremented where the event happens: the gateway for requests, the autoscaler for
`SCALING_DECISIONS` and `SLURM_JOBS`. State series (replicas by state, queue depth, in-flight, agents) are
read at scrape time by `StateCollector` from the Registry and the gateway, so they are never stale. This
module does not decide anything.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from slinfer.controller.registry import Registry
    from slinfer.kube.sync import SyncStatus

REGISTRY = CollectorRegistry(auto_describe=True)

# Buckets span a cached short answer (ms) to a long generation (minutes).
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

REQUESTS = Counter("slinfer_gateway_requests",
                   "Gateway requests answered, by model, endpoint and HTTP status",
                   ["model", "endpoint", "code"], registry=REGISTRY)
REQUEST_SECONDS = Histogram("slinfer_gateway_request_duration_seconds",
                            "Time from request received to response finished (queue wait included)",
                            ["model", "endpoint"], buckets=_LATENCY_BUCKETS, registry=REGISTRY)
TTFT_SECONDS = Histogram("slinfer_gateway_time_to_first_token_seconds",
                         "Streaming requests: time from request received to the engine's first chunk relayed",
                         ["model"], buckets=_LATENCY_BUCKETS, registry=REGISTRY)
QUEUE_WAIT_SECONDS = Histogram("slinfer_gateway_queue_wait_seconds",
                               "Time requests waited for a routable replica (only those that waited)",
                               ["model"], buckets=_LATENCY_BUCKETS, registry=REGISTRY)
# Per Slurm account, for a site's bill and dashboards (the ledger's CSV has the same per key, user and day): every
# request a key of the account sent, by HTTP status, and the prompt and completion tokens of its answers. A key
# without an account counts under account "".
ACCOUNT_REQUESTS = Counter("slinfer_account_requests", "Gateway requests of each Slurm account's keys, by model and "
                           "HTTP status", ["account", "model", "code"], registry=REGISTRY)
ACCOUNT_TOKENS = Counter("slinfer_account_tokens", "Tokens of each Slurm account's answers, by model and kind "
                         "(prompt, completion)", ["account", "model", "kind"], registry=REGISTRY)
RETRIES = Counter("slinfer_gateway_retries",
                  "Requests re-sent to another engine after a failure before any byte",
                  ["model"], registry=REGISTRY)
# The autoscaler increments this on every decision it acts on (action: scale_up, cancel_pending, drain, ...).
SCALING_DECISIONS = Counter("slinfer_scaling_decisions", "Autoscaler decisions acted on, by model and action",
                            ["model", "action"], registry=REGISTRY)
# The autoscaler sets this after each squeue (clear() first, so finished jobs' labels vanish).
SLURM_JOBS = Gauge("slinfer_slurm_jobs", "Controller-submitted Slurm jobs, by model and Slurm state",
                   ["model", "state"], registry=REGISTRY)


class StateCollector(Collector):
    """Scrape-time view of the Registry and the gateway's queues."""

    def __init__(self, registry: Registry, models: Iterable[str],
                 in_flight: Callable[[str], int], queued: Callable[[str], int]) -> None:
        self._registry = registry
        self._models = list(models)
        self._in_flight = in_flight
        self._queued = queued

    def collect(self) -> Iterable[GaugeMetricFamily]:
        replicas = GaugeMetricFamily("slinfer_replicas",
                                     "Engines known to the registry, by model and state (DRAINING, and LOST "
                                     "for an engine whose agent is silent, override the engine's own state)",
                                     labels=["model", "state"])
        outstanding = GaugeMetricFamily("slinfer_replica_outstanding",
                                        "Requests the gateway has in flight to each engine",
                                        labels=["model", "job_id", "node"])
        counts: dict[tuple[str, str], int] = {(m, "READY"): 0 for m in self._models}
        alive = {a.node for a in self._registry.agents() if self._registry.agent_alive(a.node)}
        for r in self._registry.replicas():
            state = "LOST" if r.node not in alive else "DRAINING" if r.draining else r.state_name
            counts[(r.model, state)] = counts.get((r.model, state), 0) + 1
            outstanding.add_metric([r.model, r.job_id, r.node], r.outstanding)
        for (model, state), n in sorted(counts.items()):
            replicas.add_metric([model, state], n)
        yield replicas
        yield outstanding
        queue = GaugeMetricFamily("slinfer_gateway_queue_depth", "Requests waiting for a routable replica",
                                  labels=["model"])
        flight = GaugeMetricFamily("slinfer_gateway_in_flight", "Requests being served by an engine",
                                   labels=["model"])
        for m in self._models:
            queue.add_metric([m], self._queued(m))
            flight.add_metric([m], self._in_flight(m))
        yield queue
        yield flight
        agents = GaugeMetricFamily("slinfer_agents", "Node agents known, by whether they report in time",
                                   labels=["alive"])
        known = self._registry.agents()
        agents.add_metric(["true"], len(alive))
        agents.add_metric(["false"], len(known) - len(alive))
        yield agents


class GaugeCollector(Collector):
    """One unlabelled gauge read at scrape time (the gateway tier's feed state, the controller's gateways)."""

    def __init__(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        self._name = name
        self._documentation = documentation
        self._read = read

    def collect(self) -> Iterable[GaugeMetricFamily]:
        yield GaugeMetricFamily(self._name, self._documentation, value=self._read())


class KubeCollector(Collector):
    """The controller's Kubernetes side at scrape time (KubeSync.status()): reachable, last success, failed
    rounds, whether this controller leads, and its writes; every series carries the controller's identity (its
    leader election identity, else `identity`)."""

    def __init__(self, status: Callable[[], SyncStatus | None] | None = None, identity: str = "") -> None:
        # Attached after construction where the sync is built after the gateway that serves /metrics.
        self.status = status
        self._identity = identity

    def collect(self) -> Iterable[Metric]:
        st = self.status() if self.status is not None else None
        series = (
            ("slinfer_kubernetes_api_reachable", "1 when the last round got answers from the API server",
             float(st.reachable) if st else 0.0),
            ("slinfer_kubernetes_last_success_timestamp_seconds",
             "When a round last ended with every step done (0: never)", st.last_success if st else 0.0),
            ("slinfer_kubernetes_failed_rounds", "Rounds in a row with at least one failed step",
             float(st.failures) if st else 0.0),
            ("slinfer_kubernetes_leader", "1 when this controller leads (always 1 without leader election)",
             float(st.leader) if st else 0.0),
            ("slinfer_kubernetes_writes", "Create, patch and delete requests sent by this controller's sync",
             float(st.writes) if st else 0.0),
            ("slinfer_kubernetes_nodes_deleted", "Dead slinfer Nodes this controller deleted",
             float(st.nodes_deleted) if st else 0.0),
        )
        for name, documentation, value in series:
            family = GaugeMetricFamily(name, documentation, labels=["identity"])
            if st is not None:  # without [kubernetes] the families are declared, with no sample
                family.add_metric([st.identity or self._identity], value)
            yield family


class _Instance:
    """Every sample of `registries` with the gateway tier's instance label added (several gateways add up)."""

    def __init__(self, registries: tuple[CollectorRegistry, ...], instance: str) -> None:
        self._registries = registries
        self._instance = instance

    def collect(self) -> Iterable[Metric]:
        for registry in self._registries:
            for family in registry.collect():
                family.samples = [s._replace(labels={**s.labels, "gateway": self._instance})
                                  for s in family.samples]
                yield family


def render(state: CollectorRegistry, instance: str = "") -> bytes:
    """The text exposition of the event series followed by the state series; with `instance`, each sample
    carries `gateway="INSTANCE"`."""
    if instance:
        return generate_latest(_Instance((REGISTRY, state), instance))  # type: ignore[arg-type]
    return generate_latest(REGISTRY) + generate_latest(state)


# Labelled children of the account series, cached (.labels() takes a lock and builds a tuple on every call).
_ACCOUNT_CHILDREN: dict[tuple[str, ...], Any] = {}


def count_account(account: str, model: str, status: int, prompt_tokens: int, completion_tokens: int) -> None:
    """One request of a key of `account`: its status, and its answer's tokens."""
    key = ("r", account, model, str(status))
    child = _ACCOUNT_CHILDREN.get(key)
    if child is None:
        child = _ACCOUNT_CHILDREN[key] = ACCOUNT_REQUESTS.labels(account, model, str(status))
    child.inc()
    for kind, tokens in (("prompt", prompt_tokens), ("completion", completion_tokens)):
        if tokens:
            key = ("t", account, model, kind)
            child = _ACCOUNT_CHILDREN.get(key)
            if child is None:
                child = _ACCOUNT_CHILDREN[key] = ACCOUNT_TOKENS.labels(account, model, kind)
            child.inc(tokens)
