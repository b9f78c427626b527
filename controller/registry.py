"""The registry: which agents and engines exist, as their heartbeats describe them.

Agents open one `Registry.Report` stream each and send every engine they run on each heartbeat; the registry
keeps one `Replica` per engine (keyed by job id) and one `AgentInfo` per node. It answers "where can a request
for model M go" (`routable`) and lets the autoscaler mark a replica draining. It does not route, count
requests (inflight.py updates `Replica.outstanding`), or start and stop jobs.

An agent silent for `agent_timeout_s` loses its engines from routing at once (checked on every read, so no
timer is needed for correctness); a sweep forgets it entirely after a longer grace, in case it comes back.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc

from slinfer.v1 import controller_pb2, controller_pb2_grpc, engine_pb2

log = logging.getLogger(__name__)

READY = engine_pb2.READY
_STATES = frozenset(engine_pb2.EngineState.values())


@dataclass(eq=False)
class Replica:
    """One engine as the controller sees it."""

    job_id: str
    model: str
    node: str
    base_url: str
    api_key: str
    state: int
    pool: bool
    draining: bool = False
    running: float = 0.0
    waiting: float = 0.0
    kv_cache_usage: float = 0.0
    # Requests the gateway has in flight on this engine; written only by inflight.InFlight.
    outstanding: int = 0
    started_at: float = 0.0
    ready_at: float = 0.0
    last_seen: float = 0.0
    reason: str = ""

    @property
    def state_name(self) -> str:
        return engine_pb2.EngineState.Name(self.state)


@dataclass
class AgentInfo:
    node: str
    address: str
    agent_id: str
    last_seen: float
    connected: bool
    job_ids: list[str] = field(default_factory=list)
    host: controller_pb2.HostTelemetry | None = None
    gpus: list[controller_pb2.GpuTelemetry] = field(default_factory=list)
    # What the last fully applied report said of the agent and its engines (`Registry._signature`), with the
    # replica of each of those engines: a report that says the same again only refreshes loads and last_seen.
    steady: tuple[tuple[object, ...], list[Replica]] | None = field(default=None, repr=False, compare=False)


class Registry:
    """Agents and their engines; the single source of "where can a request go".

    All methods run on the event loop thread; nothing here blocks.
    """

    def __init__(self, agent_timeout_s: float = 6.0, clock: Callable[[], float] = time.time,
                 forget_after_s: float | None = None, pool_users: frozenset[str] | None = None) -> None:
        self._timeout = agent_timeout_s
        # Whose engines the shared pool takes (config.pool_users), whatever an agent reports; None takes any
        # (the gateway tier's mirror, which gets only the controller's pool, and tests of other things).
        self._pool_users = pool_users
        # Keep a silent agent's record (shown by `slinfer status`) for a while before forgetting it.
        self._forget_after = forget_after_s if forget_after_s is not None else max(60.0, 10 * agent_timeout_s)
        self._clock = clock
        self._agents: dict[str, AgentInfo] = {}
        self._replicas: dict[str, Replica] = {}
        self._by_model: dict[str, list[Replica]] = {}
        self._listeners: list[Callable[[str], None]] = []
        # `listener(job_id)` for every replica whose routed fields changed, that appeared or that went: the
        # gateway feed publishes those rows only, not the whole registry per change (issue 35.7).
        self._replica_listeners: list[Callable[[str], None]] = []
        # Nodes in the order they last reported (a report moves its node to the end): the silent ones are at
        # the front, so finding them costs what they number, not what the cluster does.
        self._by_seen: dict[str, None] = {}
        # Reports that only refreshed loads and last_seen (nothing else in them had changed), and the others.
        self.reports_unchanged = 0
        self.reports_applied = 0

    # ---- reads -------------------------------------------------------------------------------------
    def replicas(self, model: str | None = None) -> list[Replica]:
        if model is None:
            return list(self._replicas.values())
        return list(self._by_model.get(model, ()))

    def routable(self, model: str) -> list[Replica]:
        """READY, pooled, not draining, and on an agent heard from within the timeout."""
        reps = self._by_model.get(model)
        if not reps:
            return []
        oldest = self._clock() - self._timeout
        return [r for r in reps if r.state == READY and r.pool and not r.draining and r.last_seen >= oldest]

    def has_routable(self, model: str) -> bool:
        """Whether `routable(model)` would list any: stops at the first (the feed asks it of every model each
        publication, and at 5,000 nodes listing them all was the largest piece of the loop's remaining stalls)."""
        oldest = self._clock() - self._timeout
        return any(r.state == READY and r.pool and not r.draining and r.last_seen >= oldest
                   for r in self._by_model.get(model, ()))

    def get(self, job_id: str) -> Replica | None:
        return self._replicas.get(job_id)

    def agents(self) -> list[AgentInfo]:
        return list(self._agents.values())

    def agent_alive(self, node: str) -> bool:
        agent = self._agents.get(node)
        return agent is not None and agent.last_seen >= self._clock() - self._timeout

    def silent_agents(self) -> list[str]:
        """The nodes whose agents were not heard from within the timeout (their engines are not routed); costs
        what they number, plus one, however many agents report in time."""
        oldest = self._clock() - self._timeout
        silent = []
        for node in self._by_seen:
            agent = self._agents.get(node)
            if agent is None:
                continue
            if agent.last_seen >= oldest:
                break
            silent.append(node)
        return silent

    def job_ids(self, node: str) -> list[str]:
        """The engines a node's agent reported last."""
        agent = self._agents.get(node)
        return list(agent.job_ids) if agent is not None else []

    # ---- writes ------------------------------------------------------------------------------------
    def set_draining(self, job_id: str, draining: bool = True) -> bool:
        replica = self._replicas.get(job_id)
        if replica is None:
            return False
        if replica.draining != draining:
            log.info("replica %s (%s on %s) draining=%s, outstanding=%d",
                     job_id, replica.model, replica.node, draining, replica.outstanding)
        if replica.draining != draining:
            replica.draining = draining
            self._replica_changed(job_id)
        if not draining:
            self._notify(replica.model)
        return True

    def subscribe(self, listener: Callable[[str], None]) -> None:
        """`listener(model)` is called whenever a replica of `model` may have become routable."""
        self._listeners.append(listener)

    def subscribe_replicas(self, listener: Callable[[str], None]) -> None:
        """`listener(job_id)` is called whenever that replica appeared, went, or changed its node, address, key,
        state, pool flag or drain (not its load, which changes on every report)."""
        self._replica_listeners.append(listener)

    def report(self, report: controller_pb2.AgentReport) -> None:
        """Applies one heartbeat: the report lists every engine of the agent, so absent ones are gone.

        A report that says what the agent's last one said of itself and its engines (all but their load, the
        host's and GPUs' telemetry and the send time), from an agent heard in time and whose replicas are still
        its own, only refreshes those and last_seen: no replica is looked up, compared, published or woken.
        """
        now = self._clock()
        node = report.node
        agent = self._agents.get(node)
        engines = [e for e in report.engines if e.job_id]
        signature = self._signature(report, engines)
        if agent is not None and agent.steady is not None and agent.steady[0] == signature \
                and agent.last_seen >= now - self._timeout and self._still_own(agent.steady[1], node):
            self.reports_unchanged += 1
            self._heard(agent, report, now)
            for replica, engine in zip(agent.steady[1], engines, strict=True):
                load = engine.load
                replica.running = load.running
                replica.waiting = load.waiting
                replica.kv_cache_usage = load.kv_cache_usage
                replica.last_seen = now
            return
        self.reports_applied += 1
        if agent is None:
            agent = AgentInfo(node=node, address=report.address, agent_id=report.agent_id, last_seen=now,
                              connected=True)
            self._agents[node] = agent
            log.info("agent %s registered (address %s, agent id %s, %d engines)",
                     node, report.address, report.agent_id, len(report.engines))
        elif agent.agent_id != report.agent_id:
            log.info("agent %s restarted (agent id %s -> %s)", node, agent.agent_id, report.agent_id)
        agent.address = report.address
        agent.agent_id = report.agent_id
        self._heard(agent, report, now)

        seen: set[str] = set()
        woke: set[str] = set()
        for engine in report.engines:
            if not engine.job_id:
                continue
            seen.add(engine.job_id)
            if self._apply_engine(node, engine, now):
                woke.add(engine.model)
        for job_id in agent.job_ids:
            if job_id not in seen:
                replica = self._replicas.get(job_id)
                if replica is not None and replica.node == node:
                    log.info("replica %s (%s on %s) is gone from its agent's report",
                             job_id, replica.model, node)
                    self._remove(job_id)
        agent.job_ids = sorted(seen)
        # A report that lists a job twice is applied in full every time, as its engines override each other.
        agent.steady = (signature, [self._replicas[e.job_id] for e in engines]) if len(seen) == len(engines) \
            else None
        for model in woke:
            self._notify(model)

    def _heard(self, agent: AgentInfo, report: controller_pb2.AgentReport, now: float) -> None:
        """What every report refreshes: when the agent was heard (its node moves to the end of `_by_seen`) and
        its host's and GPUs' telemetry."""
        agent.last_seen = now
        self._by_seen.pop(agent.node, None)
        self._by_seen[agent.node] = None
        agent.connected = True
        agent.host = report.host if report.HasField("host") else None
        agent.gpus = list(report.gpus)

    @staticmethod
    def _signature(report: controller_pb2.AgentReport, engines: list[engine_pb2.Engine]) -> tuple[object, ...]:
        """Everything of a report that `report` applies beyond loads, telemetry and last_seen."""
        return (report.address, report.agent_id,
                *[(e.job_id, e.model, e.state, e.reason, e.base_url, e.api_key, e.pool, e.user, e.started_at,
                   e.ready_at) for e in engines])

    def _still_own(self, replicas: list[Replica], node: str) -> bool:
        """Every one of `replicas` is still the registry's replica of its job, on `node` (another agent may have
        reported the job since, or a mirror replaced it)."""
        known = self._replicas
        return all(known.get(r.job_id) is r and r.node == node for r in replicas)

    def mirror(self, replicas: list[Replica], alive_nodes: set[str]) -> None:
        """Replaces everything with a controller's snapshot (the gateway tier's copy of the routes).

        Replicas already known keep their object (requests in flight hold it and count on it); the agents are
        those of the snapshot, heard from now when the controller still hears them, long ago otherwise.
        """
        now = self._clock()
        woke: set[str] = set()
        fresh: dict[str, Replica] = {}
        for new in replicas:
            old = self._replicas.get(new.job_id)
            was = old is not None and old.model == new.model and self._routable_now(old, now)
            if old is not None and old.model == new.model:
                for name in ("node", "base_url", "api_key", "state", "pool", "draining"):
                    setattr(old, name, getattr(new, name))
                new = old
            new.last_seen = now if new.node in alive_nodes else -math.inf
            fresh[new.job_id] = new
            if not was and self._routable_now(new, now):
                woke.add(new.model)
        changed = set(self._replicas) | set(fresh)
        self._replicas = fresh
        self._by_model = {}
        for replica in fresh.values():
            self._by_model.setdefault(replica.model, []).append(replica)
        # Grouped in one pass: a scan of every replica per node took 10.9 s at 5,000 nodes x 8 (issue 35.7).
        by_node: dict[str, list[str]] = {n: [] for n in alive_nodes}
        for replica in fresh.values():
            by_node.setdefault(replica.node, []).append(replica.job_id)
        nodes = set(by_node)
        self._agents = {n: AgentInfo(node=n, address="", agent_id="", connected=n in alive_nodes,
                                     last_seen=now if n in alive_nodes else -math.inf, job_ids=sorted(job_ids))
                        for n, job_ids in by_node.items()}
        self._by_seen = dict.fromkeys(sorted(nodes, key=lambda n: self._agents[n].last_seen))
        for job_id in changed:
            self._replica_changed(job_id)
        for model in woke:
            self._notify(model)

    def _routable_now(self, r: Replica, now: float) -> bool:
        return r.state == READY and r.pool and not r.draining and r.last_seen >= now - self._timeout

    def disconnected(self, node: str) -> None:
        """The agent's stream ended; its engines stay routable until the timeout, as it may reconnect."""
        agent = self._agents.get(node)
        if agent is not None:
            agent.connected = False

    def sweep(self) -> None:
        """Forgets agents (and their engines) silent for much longer than the routing timeout."""
        limit = self._clock() - self._forget_after
        for node, agent in list(self._agents.items()):
            if agent.last_seen < limit:
                log.info("forgetting agent %s, silent for %.0f s", node, self._clock() - agent.last_seen)
                for job_id in agent.job_ids:
                    replica = self._replicas.get(job_id)
                    if replica is not None and replica.node == node:
                        self._remove(job_id)
                del self._agents[node]
                self._by_seen.pop(node, None)

    # ---- internals ---------------------------------------------------------------------------------
    def _pool(self, node: str, engine: engine_pb2.Engine) -> bool:
        """The engine's pool flag, refused for a user the pool does not take (defence in depth: the agent
        refuses such a job first, but the gateway must never route other tenants' prompts to it)."""
        if not engine.pool or self._pool_users is None or engine.user in self._pool_users:
            return engine.pool
        old = self._replicas.get(engine.job_id)
        if old is None or old.pool or old.model != engine.model:
            log.warning("replica %s (%s on %s) of user %r claims the shared pool; only %s may publish to it: "
                        "not routed", engine.job_id, engine.model, node, engine.user,
                        ", ".join(sorted(self._pool_users)))
        return False

    def _apply_engine(self, node: str, engine: engine_pb2.Engine, now: float) -> bool:
        """Updates or adds one replica; True when it may just have become routable."""
        pool = self._pool(node, engine)
        replica = self._replicas.get(engine.job_id)
        if replica is None or replica.model != engine.model:
            if replica is not None:
                self._remove(engine.job_id)
            replica = Replica(job_id=engine.job_id, model=engine.model, node=node, base_url=engine.base_url,
                              api_key=engine.api_key, state=engine.state, pool=pool,
                              started_at=engine.started_at, ready_at=engine.ready_at)
            self._replicas[engine.job_id] = replica
            self._by_model.setdefault(engine.model, []).append(replica)
            log.info("replica %s (%s on %s) appeared, state %s, pool=%s",
                     engine.job_id, engine.model, node, replica.state_name, pool)
            was_routable = False
            self._replica_changed(engine.job_id)
        else:
            if (replica.node, replica.base_url, replica.api_key, replica.state, replica.pool) != (
                    node, engine.base_url, engine.api_key, engine.state, pool):
                self._replica_changed(engine.job_id)
            was_routable = (replica.state == READY and replica.pool
                            and replica.last_seen >= now - self._timeout)
            if replica.state != engine.state:
                log.info("replica %s (%s on %s) %s -> %s%s", engine.job_id, engine.model, node,
                         replica.state_name, engine_pb2.EngineState.Name(engine.state),
                         f" ({engine.reason})" if engine.reason else "")
        replica.node = node
        replica.base_url = engine.base_url
        replica.api_key = engine.api_key
        replica.state = engine.state
        replica.pool = pool
        replica.started_at = engine.started_at
        replica.ready_at = engine.ready_at
        replica.reason = engine.reason
        replica.running = engine.load.running
        replica.waiting = engine.load.waiting
        replica.kv_cache_usage = engine.load.kv_cache_usage
        replica.last_seen = now
        return not was_routable and replica.state == READY and replica.pool and not replica.draining

    def _remove(self, job_id: str) -> None:
        replica = self._replicas.pop(job_id, None)
        if replica is None:
            return
        self._replica_changed(job_id)
        reps = self._by_model.get(replica.model)
        if reps is not None:
            reps[:] = [r for r in reps if r is not replica]
            if not reps:
                del self._by_model[replica.model]

    def _notify(self, model: str) -> None:
        for listener in self._listeners:
            listener(model)

    def _replica_changed(self, job_id: str) -> None:
        for listener in self._replica_listeners:
            listener(job_id)


class RegistryService(controller_pb2_grpc.RegistryServicer):
    """The gRPC face of the Registry: authenticates each agent stream and feeds its reports in."""

    def __init__(self, registry: Registry, token: str = "", heartbeat_s: float = 1.0) -> None:
        self._registry = registry
        self._token = token.encode()
        self._heartbeat = heartbeat_s

    async def Report(self, request_iterator: AsyncIterator[controller_pb2.AgentReport],
                     context: grpc.aio.ServicerContext) -> None:
        """One agent's stream: each report is checked and applied; the first, and any that asks (`want_ack`), is
        acked. The agent needs only the first ack (it marks the agent connected and carries the heartbeat); an ack
        for every report, a gRPC send and a wake-up of the loop each, cost 15-27 % of the controller's CPU per
        report (issue 35.4: 195 -> 167 and 231 -> 169 µs in paired runs of 1,000 agents each, both orders).

        Read and written through the context, not as an async generator over `request_iterator`: that adds two
        generators' steps to every report, about 4 % of the controller's CPU per report (paired runs of 1,000 nodes
        each, in both orders, issue 35.4)."""
        node = ""
        ack = controller_pb2.ReportAck(heartbeat_interval=self._heartbeat)
        try:
            while True:
                report = await context.read()
                if report is grpc.aio.EOF:
                    break
                if self._token and not hmac.compare_digest(report.token.encode(), self._token):
                    log.warning("agent report from %r (peer %s) rejected: wrong token",
                                report.node, context.peer())
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "wrong or missing agent token")
                if not report.node:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "report without a node name")
                bad = next((e for e in report.engines if e.state not in _STATES), None)
                if bad is not None:
                    # An unknown state would break every later reader of it (status, logs) far from here.
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"engine {bad.job_id[:40]!r} has an unknown state {bad.state}")
                if node and report.node != node:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"node changed from {node!r} to {report.node!r} within one stream")
                first = not node
                node = report.node
                self._registry.report(report)
                if first or report.want_ack:
                    await context.write(ack)
        except asyncio.CancelledError:
            raise
        finally:
            if node:
                self._registry.disconnected(node)
                log.info("agent %s stream ended", node)
