"""`slinfer-controller --config PATH`: wires the registry, gateway, autoscaler and admin API into one process.

It loads the config (a ConfigError prints the key at fault and exits 2; so does an empty `[controller].token`
without `insecure = true`), serves gRPC (Registry for agents, Admin for the CLI) on `[controller].listen`, over
TLS when `[controller].tls_cert` is set, and the gateway on `[gateway].listen`, runs the autoscaler loop,
re-reads the config on SIGHUP (controller/reload.py: the catalog's adapters and replica bounds apply, any other
change is refused naming its key), and shuts down cleanly on SIGTERM or SIGINT: the gateway stops accepting
and lets in-flight requests finish (bounded), then the gRPC server and the autoscaler stop. It holds no logic
of its own beyond the wiring.
"""

from __future__ import annotations

import os

# The controller forks sbatch/squeue/scancel while gRPC's threads run; gRPC's fork handlers are for children
# that use gRPC, which these never do, and they can crash a child before it execs (seen in the agent).
os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "false"

import argparse
import asyncio
import contextlib
import gc
import logging
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from slinfer import tls
from slinfer.backoff import AGENT_RECONNECT
from slinfer.config import DEFAULT_PATH, Config, ConfigError, load, pool_users, require_token
from slinfer.controller import metrics
from slinfer.controller.admin import AdminService, user_server
from slinfer.controller.autoscaler import Autoscaler
from slinfer.controller.balancer import Balancer
from slinfer.controller.batches import scheduler as batch_scheduler
from slinfer.controller.election import DbElection, default_identity
from slinfer.controller.eventloop import loop_factory
from slinfer.controller.files import batch_routes
from slinfer.controller.gateway import Demand, Gateway
from slinfer.controller.gatewayhub import GatewayHub
from slinfer.controller.gatewayhub import add_to_server as add_feed_to_server
from slinfer.controller.identity import OwnKeys
from slinfer.controller.jobtable import JobTable
from slinfer.controller.keys import KeyStore, KeyStoreError
from slinfer.controller.limits import GroupTokens, KeyLimits, Limiter
from slinfer.controller.modelstatus import ModelBoard
from slinfer.controller.pins import Pins, PinStore, PinStoreError
from slinfer.controller.proxy import Proxy
from slinfer.controller.queue import for_gateway as queue_for_gateway
from slinfer.controller.registry import Registry, RegistryService
from slinfer.controller.reload import Reloader
from slinfer.controller.slurm import SlurmClient
from slinfer.controller.store import Database, StoreError, open_database
from slinfer.controller.usage import UsageLedger
from slinfer.kube.api import ClientKubeAPI, KubeError
from slinfer.kube.leader import LeaderElection
from slinfer.kube.objects import GatewayEndpoint
from slinfer.kube.sync import KubeSync
from slinfer.v1 import admin_pb2_grpc, controller_pb2_grpc
from slinfer.waits import within

log = logging.getLogger("slinfer.controller")

# How long in-flight gateway requests may take to finish after SIGTERM before they are cut.
SHUTDOWN_GRACE_S = 30.0
# How often silent agents are checked for being forgotten (routing drops them at once on its own).
SWEEP_INTERVAL_S = 5.0


class StartupError(RuntimeError):
    """The controller cannot start (a port in use, an unreadable key file); the message says which."""


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


async def serve(config: Config, stop: asyncio.Event,
                on_ready: Callable[[int, int], Awaitable[None] | None] | None = None,
                hangup: asyncio.Event | None = None) -> None:
    """Runs the controller until `stop` is set; `on_ready(grpc_port, gateway_port)` once all listen; each time
    `hangup` is set (SIGHUP) the config file is read again and applied where it may be (controller/reload.py)."""
    c = config.controller
    try:
        require_token(config)
        credentials = tls.server_credentials(config)
    except ConfigError as exc:
        raise StartupError(f"config error: {exc}") from exc
    _warn_insecure(config)
    # The database of keys, pins and the usage ledger (controller/store.py); with [state].leader_election this
    # controller waits here, listening on nothing, until it holds the database's lease: a standby.
    try:
        db = open_database(config.state.database, config.state.password_file, c.state_dir)
    except ValueError as exc:
        raise StartupError(f"config error: {exc}") from exc
    election = await _lead(config, db, stop) if config.state.leader_election else None
    if config.state.leader_election and election is None:
        return  # stopped while a standby
    # Built in one direction: each object is made after everything it reads, so no lambda names one not built yet.
    # The pins first: the one owner of live pins (with `slinfer scale`'s saved ones taken again); the autoscaler,
    # the gateway, the hub and the model board read them.
    try:
        pins = Pins(config.models, PinStore(Path(c.state_dir) / "pins.json", db))
    except PinStoreError as exc:
        raise StartupError(str(exc)) from exc
    registry = Registry(agent_timeout_s=c.agent_timeout_s, pool_users=pool_users(config))
    try:
        keys = KeyStore(Path(c.state_dir) / "keys.json", config.gateway.api_keys, db=db)
    except KeyStoreError as exc:
        raise StartupError(str(exc)) from exc
    g = config.gateway
    try:
        ledger = UsageLedger(Path(c.state_dir) / "usage", g.usage_flush_s, db=db)
    except StoreError as exc:
        raise StartupError(f"usage ledger: {exc}") from exc
    limiter = Limiter(KeyLimits(g.key_requests_per_minute, g.key_burst, g.key_tokens_per_day),
                      ledger.tokens_today, accounts=g.accounts, users=g.users,
                      group_tokens=GroupTokens(keys, ledger.tokens_today))
    queue = queue_for_gateway(config.gateway)
    # The autoscaler's jobs, written by its steps; /v1/models reads them (a pending reason, a start time).
    job_table = JobTable()
    board = ModelBoard(config.models, registry, jobs=job_table.jobs, refusals=job_table.refusal)
    # The gateway tier's feed; a restarted controller sends its first table once every live agent reported. It
    # carries the board's view of each model short of ready, which only the controller has.
    hub = GatewayHub(registry, keys, limiter, ledger, c.token, pins.scaled_to_zero,
                     [m.name for m in config.models], warmup_s=AGENT_RECONNECT.max_s + 2 * c.heartbeat_s,
                     model_states=board.feed_states)
    # Kubernetes' series stay empty until the sync below is attached to them (and without [kubernetes]).
    kube_metrics = metrics.KubeCollector(identity=socket.gethostname())
    gateway = Gateway(config.gateway, config.models, registry, keys,
                      Proxy(config.gateway.connect_timeout_s, config.gateway.read_timeout_s,
                            config.gateway.client_timeout_s,
                            tls.engine_client_context(config) if config.gateway.engine_ca else None),
                      Balancer(), queue,
                      limiter, ledger, board, scaled_to_zero=pins.scaled_to_zero,
                      state_collectors=[metrics.GaugeCollector(
                          "slinfer_gateways_connected", "slinfer-gateway processes watching this controller",
                          lambda: float(hub.connected())), kube_metrics])
    gateway.extra_routes.extend(batch_routes(config, keys.verify))
    slurm = SlurmClient(c.slurm_bin_dir, job_command=c.job_command, job_output=c.job_output)
    # The site's order first: a model whose account, partition or QOS this user may not use fails here, named.
    problems = await slurm.site_order_problems(config.models)
    if problems:
        raise StartupError("the catalog asks Slurm for what this user may not use:\n  " + "\n  ".join(problems))
    kube_sync = _kube_sync(config, registry, slurm) if config.kubernetes.enabled else None
    if kube_sync is not None:
        kube_metrics.status = kube_sync.status

    def demand(model: str) -> Demand:
        here, there = gateway.demand(model), hub.demand(model)
        return Demand(in_flight=here.in_flight + there.in_flight, queued=here.queued + there.queued)

    # Last, the autoscaler: it reads the load of both gateways, the pins, and writes the job table.
    def is_leader() -> bool:
        # Without leader election every controller leads; with Kubernetes' or the database's, only the holder acts.
        return (kube_sync is None or kube_sync.is_leader) and (election is None or election.is_leader)

    autoscaler = Autoscaler(config.models, registry, demand, slurm, job_name_prefix=c.job_name_prefix,
                            is_leader=is_leader,
                            outstanding_elsewhere=hub.outstanding, pins=pins, job_table=job_table,
                            nodes=slurm)

    # Users' own keys (`slinfer key`), proven by the site's munge.
    own_keys = OwnKeys(keys, slurm.runner, munge_socket=c.munge_socket, keys_per_user=g.keys_per_user)
    server = grpc.aio.server()
    controller_pb2_grpc.add_RegistryServicer_to_server(RegistryService(registry, c.token, c.heartbeat_s), server)
    add_feed_to_server(hub, server)  # its full state pre-serialized, in pages
    admin = AdminService(autoscaler=autoscaler, registry=registry, keys=keys, token=c.token, usage=ledger,
                         pins=pins, own_keys=own_keys, tier_in_flight=hub.in_flight)
    admin_pb2_grpc.add_AdminServicer_to_server(admin, server)
    users = None
    if c.user_listen:
        try:
            users, _ = user_server(config, admin)
        except ValueError as exc:
            raise StartupError(str(exc)) from exc
    try:
        grpc_port = (server.add_secure_port(c.listen, credentials) if credentials is not None
                     else server.add_insecure_port(c.listen))
    except RuntimeError as exc:
        raise StartupError(f"controller.listen: cannot listen on {c.listen}: {exc}") from exc
    if not grpc_port:
        raise StartupError(f"controller.listen: cannot listen on {c.listen}")
    await server.start()
    if users is not None:
        await users.start()
        log.info("users' key port on %s (`slinfer key`, munge-proven)", c.user_listen)
    tasks: list[asyncio.Task[None]] = []
    try:
        # [controller].gateway_listen: the built-in gateway beside a slinfer-gateway that serves [gateway].listen.
        listen, listen_key = ((c.gateway_listen, "controller.gateway_listen") if c.gateway_listen
                              else (config.gateway.listen, "gateway.listen"))
        host, port = split_listen(listen)
        try:
            gateway_port = await gateway.start(host, port, SHUTDOWN_GRACE_S)
        except OSError as exc:
            raise StartupError(f"{listen_key}: cannot listen on {listen}: {exc}") from exc
        log.info("controller up: registry/admin gRPC on %s (%s), gateway on %s:%d, %d catalog models (%s), "
                 "agent timeout %.1f s, autoscale every %.1f s", c.listen,
                 ("mutual TLS" if c.tls_client_auth else "TLS") if credentials is not None else "PLAINTEXT",
                 host, gateway_port, len(config.models),
                 ", ".join(m.name for m in config.models) or "none", c.agent_timeout_s, c.autoscale_interval_s)
        tasks.append(asyncio.create_task(autoscaler.run(c.autoscale_interval_s), name="autoscaler"))
        tasks.append(asyncio.create_task(_sweep(registry), name="registry-sweep"))
        tasks.append(asyncio.create_task(ledger.run(), name="usage-ledger"))
        tasks.append(asyncio.create_task(own_keys.run(), name="key-expiry"))
        # The Batch API's jobs (issue 31): submits, follows and finalises the spool's batches.
        tasks.append(asyncio.create_task(batch_scheduler(config, slurm, ledger, is_leader).run(stop),
                                         name="batch-scheduler"))
        if kube_sync is not None:
            tasks.append(asyncio.create_task(kube_sync.run(), name="kubernetes-sync"))
        lost = asyncio.Event()
        if election is not None:
            tasks.append(asyncio.create_task(_hold(election, config.state.renew_interval_s, stop, lost),
                                             name="database-lease"))
        if hangup is not None:
            reloader = Reloader(config, [autoscaler, pins], gateway.update_catalog)
            tasks.append(asyncio.create_task(_reload_on(hangup, reloader), name="config-reload"))
        # Everything allocated so far lives as long as the process; keep it out of the collector's scans.
        # Measured with bench/gateway_overhead.py at 1000 concurrent: gen2 pauses went from 85-165 ms to 15 ms.
        gc.collect()
        gc.freeze()
        if on_ready is not None:
            result = on_ready(grpc_port, gateway_port)
            if result is not None:
                await result
        await stop.wait()
        if lost.is_set():
            raise StartupError("lost the database's lease to another controller: stopped (its supervisor starts "
                               "it again as a standby)")
        log.info("controller stopping: %d requests in flight, %d queued",
                 sum(gateway.demand(m.name).in_flight for m in config.models),
                 sum(gateway.demand(m.name).queued for m in config.models))
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await gateway.stop()
        ledger.close()  # what the last requests used
        await server.stop(grace=2.0)
        if users is not None:
            await users.stop(grace=2.0)
        if election is not None:
            await election.release()  # after the ledger's last write: a standby takes over at once
        log.info("controller stopped")


def _warn_insecure(config: Config) -> None:
    """Says at every start, at WARNING, what an operator gave up; nothing here stops the start."""
    c = config.controller
    if c.insecure and not c.token:
        log.warning("INSECURE: [controller].insecure = true and no [controller].token: any host that reaches "
                    "%s can register engines and call the admin API. Set a token and remove insecure", c.listen)
    elif c.insecure:
        log.warning("[controller].insecure = true has no effect while a token is set; remove it")
    if not c.tls_cert:
        log.warning("INSECURE: the gRPC port %s is plaintext: agents' reports carry every engine's API key in "
                    "the clear. Set [controller].tls_cert, tls_key and tls_ca", c.listen)


def _kube_sync(config: Config, registry: Registry, slurm: SlurmClient) -> KubeSync:
    k = config.kubernetes
    try:
        api = ClientKubeAPI.from_config(k, field_manager="slinfer-controller")
    except KubeError as exc:
        raise StartupError(f"kubernetes: cannot load credentials: {exc}") from exc
    election = (LeaderElection(api, k.namespace, LeaderElection.default_identity(),
                               lease_duration_s=k.lease_duration_s, announce=True) if k.leader_election else None)
    gateway_port = int(config.gateway.listen.rpartition(":")[2])
    gateway = GatewayEndpoint(k.gateway_address, gateway_port) if k.gateway_address else None
    return KubeSync(api, [m.name for m in config.models], registry, slurm, namespace=k.namespace,
                    leader_election=election, gateway=gateway, gc_grace_s=k.gc_grace_s,
                    interval_s=k.renew_interval_s)


async def _lead(config: Config, db: Database, stop: asyncio.Event) -> DbElection | None:
    """A standby's wait: steps the database election every renew interval until this controller leads (then
    returns it) or `stop` is set (None)."""
    s = config.state
    election = DbElection(db, default_identity(), lease_duration_s=s.lease_duration_s)
    log.info("standby %s: waiting for the lease in %s (takeover after %.0f s without a renewal)",
             election.identity, db.name, s.lease_duration_s)
    while not stop.is_set():
        try:
            if await election.step():
                return election
        except StoreError as exc:
            log.warning("standby %s: %s", election.identity, exc)
        await within(stop.wait(), s.renew_interval_s)
    return None


async def _hold(election: DbElection, interval_s: float, stop: asyncio.Event, lost: asyncio.Event) -> None:
    """The leader renews its lease every `interval_s`; once it no longer leads (another took over, or it could
    not renew in time) it stops, and nothing of its state is written after (the fence)."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await election.step()
        except StoreError as exc:
            log.warning("database lease: cannot renew: %s", exc)
        if not election.is_leader:
            log.error("database lease lost (holder now %r): stopping", election.holder)
            lost.set()
            stop.set()
            return


async def _reload_on(hangup: asyncio.Event, reloader: Reloader) -> None:
    while True:
        await hangup.wait()
        hangup.clear()  # a SIGHUP during the reload reads the file once more after it
        await reloader.reload()


async def _sweep(registry: Registry) -> None:
    while True:
        await asyncio.sleep(SWEEP_INTERVAL_S)
        registry.sweep()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slinfer-controller", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_PATH), help=f"the site config (default {DEFAULT_PATH})")
    args = parser.parse_args(argv)
    try:
        config = load(args.config)
        require_token(config)
    except ConfigError as exc:
        print(f"slinfer-controller: config error in {args.config}: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.controller.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def run() -> None:
        stop, hangup = asyncio.Event(), asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, hangup.set)
        await serve(config, stop, hangup=hangup)

    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            runner.run(run())
    except StartupError as exc:
        print(f"slinfer-controller: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
